"""Who votes for each eviction: counted over mixed streams whose frames nearly fill max_chunk, so the pending tokens
(system turn, an answer's last token and closing text) cannot join the next chunk and must be fed ahead of it."""

import pytest
from engine_helpers import frame, make_session

from infmllm_ros.cache import CacheConfig

FRAME_TOKENS = {"llava_llama": 30, "qwen2_vl": 20}  # the tiny families' 16x16-ish frames (see test_session_oracle)


class VoteCounter:
    """Wraps one session's cache: per prefill forward its query count, per end_chunk whether it evicted and how many
    queries voted (the window of that chunk's last prefill forward)."""

    def __init__(self, session):
        self.cache, self.prefills, self.evictions, self.end_chunks = session.cache, [], [], 0
        begin, end = self.cache.begin_forward, self.cache.end_chunk
        window = session.cache_cfg.window

        def begin_forward(pos, prefill=True):
            if prefill:
                self.prefills.append(pos.shape[-1])
            return begin(pos, prefill=prefill)

        def end_chunk():
            before = self.cache.evictions
            end()
            self.end_chunks += 1
            if self.cache.evictions > before:
                q = self.prefills[-1]
                self.evictions.append((min(window or q, q), q))  # (voters, chunk length)

        self.cache.begin_forward, self.cache.end_chunk = begin_forward, end_chunk


@pytest.mark.parametrize("fam", ["llava_llama", "qwen2_vl"])
@pytest.mark.parametrize("window", [0, 16])
def test_no_eviction_is_voted_by_a_handful_of_pending_tokens(tiny, fam, window):
    model, proc = tiny(fam)
    ft = FRAME_TOKENS[fam]
    cfg = CacheConfig(policy="saddle", budget=3 * ft, recent=8, window=window, max_chunk=ft + 2, max_new_tokens=6)
    s = make_session(model, proc, cfg, system_prompt="You are a robot assistant watching a camera stream.")
    votes = VoteCounter(s)
    inputs = 0
    for i in range(14):
        assert s.observe(frame(i), float(i)) >= ft - 1  # the frame nearly fills max_chunk
        inputs += 1
        if i % 3 == 1:
            s.ask("Go" if i % 2 else "What is on the table to the left of the robot, and how far away is it?",
                  max_new_tokens=6)
            inputs += 1
        if i % 5 == 4:
            s.observe(frame(100 + i), 100.0 + i)  # two frames in a row
            inputs += 1
    assert votes.end_chunks == inputs  # one eviction decision per real chunk, none for pending tokens alone
    assert len(votes.prefills) > inputs  # and pending tokens were fed ahead of a chunk (the path under test)
    assert len(votes.evictions) >= 10
    for voters, length in votes.evictions:
        assert voters >= min(length, 16), votes.evictions
    assert s.stats()["tokens_stored"] <= cfg.budget + 6


def test_the_answer_tail_fits_beside_a_full_chunk(tiny):
    """Longest answers (max_new_tokens) + closing text + a frame of max_chunk tokens: no CacheFullError, because the
    cache reserves the closing text on top of max_new_tokens."""
    model, proc = tiny("qwen2_vl")
    ft = FRAME_TOKENS["qwen2_vl"]
    cfg = CacheConfig(policy="saddle", budget=40, recent=4, max_chunk=ft, max_new_tokens=5)
    s = make_session(model, proc, cfg, system_prompt=None)
    assert s.cache_cfg.capacity == cfg.capacity + s.answer_tail and s.answer_tail >= 1
    votes = VoteCounter(s)
    for i in range(6):
        assert s.observe(frame(i), float(i)) == ft  # exactly max_chunk: pending never joins
        a = s.ask("Go", max_new_tokens=5, allowed_tokens_fn=lambda gen: [proc.tokenizer.convert_tokens_to_ids("a")])
        assert len(a.tokens) == 5
    assert votes.end_chunks == 12 and all(v >= min(q, 16) for v, q in votes.evictions)

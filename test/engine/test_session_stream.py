"""A long stream on a small budget: storage, positions and per-frame work stay bounded; answers still come back;
frames are encoded exactly once."""

import pytest
import torch
from engine_helpers import frame, make_session

from infmllm_ros.cache import CacheConfig
from infmllm_ros.engine import CacheFullError

N_FRAMES = 300


def test_300_frames_bounded(tiny, family):
    model, proc = tiny(family)
    cfg = CacheConfig(policy="saddle", budget=96, recent=32, window=16, sinks=4, max_chunk=128, max_new_tokens=8)
    s = make_session(model, proc, cfg)

    encoded, forwards = [], []
    enc = model.model.get_image_features
    model.model.get_image_features = lambda *a, **k: (encoded.append(1), enc(*a, **k))[1]
    begin = s.cache.begin_forward
    s.cache.begin_forward = lambda pos, prefill=True: (forwards.append(pos.shape[-1]), begin(pos, prefill=prefill))[1]
    try:
        rows, seen = [], 0
        for i in range(N_FRAMES):
            stored_before = s.stats()["tokens_stored"]
            n = s.observe(frame(i % 7, 16, 16), i * 0.1)
            seen += forwards[-1]
            st = s.stats()
            rows.append(dict(attended=stored_before + forwards[-1], **st))
            assert st["tokens_seen"] == seen  # every fed token counted, nothing re-fed
            assert st["tokens_stored"] <= cfg.budget
            assert st["next_position"] <= cfg.budget + cfg.max_chunk
            assert n <= cfg.max_chunk
        a = s.ask("What changed since t=1.5s?", max_new_tokens=4, output_logits=True)
    finally:
        del model.model.get_image_features  # back to the class method
    assert len(encoded) == N_FRAMES and len(forwards) == N_FRAMES + 1 + 3  # frames, question, 3 decoded tokens
    assert max(forwards) <= cfg.max_chunk
    assert len(a.tokens) == 4 and torch.isfinite(a.logits).all() and a.frame_stamp == (N_FRAMES - 1) * 0.1
    assert s.stats()["tokens_stored"] <= cfg.budget + 3  # the answer stays in the cache until the next chunk

    # flat per-frame cost: once full, the same number of stored tokens, positions and attended keys every frame
    late = rows[N_FRAMES // 3:]
    assert {r["tokens_stored"] for r in late} == {cfg.budget}
    assert max(r["next_position"] for r in late) == max(r["next_position"] for r in late[: len(late) // 2])
    attended = [r["attended"] for r in late]
    assert max(attended) - min(attended) <= 1  # +1: the time marker grows a digit ("t=9.9s" -> "t=10.0s")
    assert len({r["kv_bytes"] for r in rows}) == 1  # static buffers
    assert rows[-1]["cache"]["evictions"] >= N_FRAMES - 10


@pytest.mark.parametrize("policy", ["saddle", "streaming_llm", "h2o"])
@pytest.mark.parametrize("fam", ["llava_onevision", "qwen2_vl"])
def test_every_policy_through_the_session(tiny, fam, policy):
    model, proc = tiny(fam)
    cfg = CacheConfig(policy=policy, budget=80, recent=24, window=8, sinks=4, max_chunk=128, max_new_tokens=6)
    s = make_session(model, proc, cfg)
    for i in range(25):
        s.observe(frame(i % 5, 16, 16), i * 0.2)
        if policy != "full":
            assert s.stats()["tokens_stored"] <= cfg.budget
    a = s.ask("What changed?", max_new_tokens=5, output_logits=True)
    s.observe(frame(9, 16, 16), 9.0)
    b = s.ask("And now?", max_new_tokens=5, output_logits=True)
    assert torch.isfinite(a.logits).all() and torch.isfinite(b.logits).all()
    st = s.stats()
    assert st["tokens_seen"] > cfg.budget
    assert st["tokens_stored"] <= cfg.budget + 5 - 1


def test_full_policy_runs_out_cleanly(tiny):
    """policy "full" never evicts: the answer stops at "cache_full" when the buffers fill, a chunk that does not fit
    is refused before anything is fed (CacheFullError, nothing changed), and reset() recovers."""
    model, proc = tiny("qwen2_vl")
    cfg = CacheConfig(policy="full", budget=60, recent=0, sinks=0, max_chunk=40, max_new_tokens=20)
    s = make_session(model, proc, cfg)
    for i in range(5):
        s.observe(frame(i, 16, 16), i)
    a = s.ask("Go", max_new_tokens=20)
    assert a.finish_reason == "cache_full" and len(a.tokens) < 20
    assert s.stats()["tokens_stored"] == cfg.capacity + s.answer_tail  # + room for the closing text
    before = s.stats()
    with pytest.raises(CacheFullError, match="reset"):
        s.observe(frame(1, 16, 16), 30.0)
    with pytest.raises(CacheFullError):
        s.ask("Go on", max_new_tokens=5)
    after = s.stats()
    assert (after["tokens_seen"], after["frames_seen"], after["questions"]) == \
        (before["tokens_seen"], before["frames_seen"], before["questions"])
    s.reset()
    s.observe(frame(1, 16, 16), 0.0)
    assert len(s.ask("Go", max_new_tokens=3).tokens) == 3

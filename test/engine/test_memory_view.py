"""StreamingSession.memory() and Answer.evidence against independent oracles.

memory(): the test keeps its own map of which stream indices each frame occupies (from the token counts observe()
returns and the cache's seen counter) and counts the cache's kept_indices() by hand, for every policy over a
300-frame stream. evidence: with nothing evicted, the ranking and shares equal those read from
an eager full forward of the same token sequence (output_attentions), summed over layers, heads and question rows.
"""

import numpy as np
import pytest
import torch
from engine_helpers import frame, make_session
from test_session_oracle import encode_segment, merge_pixels

from infmllm_ros.cache import CacheConfig
from infmllm_ros.engine import memory_view
from infmllm_ros.engine.frames import fit
from infmllm_ros.engine.tiny import tiny_model

N_FRAMES = 300
QUESTIONS_EVERY = 60


def _configs():
    small = dict(budget=96, recent=32, window=16, sinks=4, max_chunk=128, max_new_tokens=6)
    return {"saddle": CacheConfig(policy="saddle", **small), "h2o": CacheConfig(policy="h2o", **small),
            "streaming_llm": CacheConfig(policy="streaming_llm", **small),
            "full": CacheConfig(policy="full", budget=N_FRAMES * 32 + 400, recent=0, max_chunk=128, max_new_tokens=6)}


@pytest.mark.parametrize("policy", ["saddle", "h2o", "streaming_llm", "full"])
def test_memory_counts_equal_kept_indices(tiny, policy):
    model, proc = tiny("llava_llama")
    cfg = _configs()[policy]
    s = make_session(model, proc, cfg)
    frames = []  # (stamp, first stream index, end)
    checked = 0
    for i in range(N_FRAMES):
        n = s.observe(frame(i % 11, 16, 16), 100.0 + i * 0.5)
        end = s.cache.get_seq_length()
        frames.append((100.0 + i * 0.5, end - n, end))
        if i % QUESTIONS_EVERY == QUESTIONS_EVERY - 1:
            s.ask("What changed?", max_new_tokens=4)
        if i in (2, 7) or i % 50 == 49 or i == N_FRAMES - 1:
            _check(s, frames, cfg)
            checked += 1
    assert checked == 8
    if policy != "full":
        assert s.memory()["totals"]["evictions"] >= N_FRAMES - 10


def _check(s, frames, cfg):
    kept = s.cache.kept_indices().cpu().numpy()  # [layers, heads, stored]
    mem = s.memory()
    want, fed = {}, {}
    for stamp, a, b in frames:
        c = ((kept >= a) & (kept < b)).sum(-1)  # [layers, heads]
        if c.any():
            want[stamp], fed[stamp] = c, b - a
    got = {f["stamp"]: f for f in mem["frames"]}
    assert list(got) == sorted(want)  # oldest to newest, exactly the frames with a stored token
    for stamp, c in want.items():
        f = got[stamp]
        assert f["fed"] == fed[stamp]
        assert f["kept"] == pytest.approx(float(c.mean()), abs=1e-3)
        assert (f["kept_min"], f["kept_max"]) == (int(c.min()), int(c.max()))
        budget = cfg.budget
        assert f["budget_share"] == pytest.approx(float(c.mean()) / budget, abs=1e-4)
    frame_tokens = sum(int(c.sum()) for c in want.values())
    text_tokens = sum(t["kept"] for t in mem["text"]) * kept.shape[0] * kept.shape[1]
    assert frame_tokens + text_tokens == pytest.approx(kept.size, abs=1e-2)  # every stored token is somewhere
    t = mem["totals"]
    assert (t["stored"], t["seen"], t["frames_held"]) == (kept.shape[2], s.cache.get_seq_length(), len(want))
    assert t["stored"] <= cfg.capacity and t["budget"] == cfg.budget


def test_memory_after_reset_is_empty(tiny):
    model, proc = tiny("llava_llama")
    s = make_session(model, proc, _configs()["saddle"])
    for i in range(5):
        s.observe(frame(i), float(i))
    s.reset()
    mem = s.memory()
    assert mem["frames"] == [] and mem["text"] == [] and mem["totals"]["stored"] == 0


def _eager_question():
    """A 4-frame stream and one question through the session, and the eager full forward of the same tokens."""
    model, proc = tiny_model("llava_llama", seed=0)
    system = "You are a robot."
    cfg = CacheConfig(policy="saddle", budget=1024, recent=64, window=16, max_chunk=256, max_new_tokens=8)
    s = make_session(model, proc, cfg, system_prompt=system)
    imgs = [frame(1), frame(2), frame(3), frame(4)]
    stamps = [10.0, 10.5, 11.0, 11.5]
    ns = [s.observe(im, st) for im, st in zip(imgs, stamps, strict=True)]
    question = "What is in front of the robot?"
    ans = s.ask(question, max_new_tokens=3)

    a = s.adapter
    qo, qc = a.question_wrap()
    text = a.prefix_text(system) + "".join(a.frame_text(st - stamps[0]) for st in stamps) + qo + question + qc
    ids, _mm, pix = encode_segment(proc, text, [fit(i, s.frame_min_side, s.frame_max_side) for i in imgs])
    oracle, _ = tiny_model("llava_llama", seed=0)
    oracle.set_attn_implementation("eager")
    with torch.no_grad():
        out = oracle(input_ids=torch.tensor([ids]), **merge_pixels("llava_llama", [pix]), output_attentions=True)
    n_q = len(ids) - len(s._prefix_ids) - sum(ns)
    assert n_q > 0
    starts = np.cumsum([len(s._prefix_ids)] + ns)
    bounds = [(b - n, b) for n, b in zip(ns, starts[1:], strict=True)]  # each frame's keys (nothing is evicted)
    return s, ans, out.attentions, n_q, bounds, stamps


def _ranking(atts, n_q, bounds, stamps, recency):
    """Frames by the last EVIDENCE_QUERIES queries' mass in the later half of the layers, x (newer + 1)**recency."""
    n_r = min(memory_view.EVIDENCE_QUERIES, n_q)
    col_r = sum(att[0, :, -n_r:, :].double().sum((0, 1)) for att in atts[len(atts) // 2:])
    ranked = np.array([float(col_r[a:b].sum()) * (len(bounds) - k) ** recency for k, (a, b) in enumerate(bounds)])
    weights = ranked / ranked.sum()
    return sorted(zip(weights, stamps, strict=True), reverse=True)[:3]


def test_evidence_equals_eager_attention_mass():
    """Budget above the stream: the probe's per-frame mass == the eager model's attention probabilities, ranked
    with the recency correction."""
    s, ans, atts, n_q, bounds, stamps = _eager_question()
    col = sum(att[0, :, -n_q:, :].double().sum((0, 1)) for att in atts)  # [N] mass per key
    per_frame = np.array([float(col[a:b].sum()) for a, b in bounds])
    want = _ranking(atts, n_q, bounds, stamps, memory_view.RECENCY)
    got = ans.evidence["frames"]
    assert [g["stamp"] for g in got] == [st for _w, st in want]
    np.testing.assert_allclose([g["weight"] for g in got], [w for w, _st in want], atol=2e-4)
    assert "view" not in ans.evidence
    total = float(col.sum())
    assert ans.evidence["frame_share"] == pytest.approx(per_frame.sum() / total, abs=2e-4)
    assert ans.evidence["question_share"] == pytest.approx(float(col[-n_q:].sum()) / total, abs=2e-4)
    assert ans.evidence["text_share"] == pytest.approx(float(col[:bounds[0][0]].sum()) / total, abs=2e-4)

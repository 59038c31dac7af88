"""Selection rules of each policy on hand-made candidates, and the scores the attention function hands the cache
checked against the torch reference computed from the model's own projections (layer 0)."""

import torch
from cache_helpers import VOCAB, layer0_qk, make_cache, stream, tiny_lm
from infmllm_ros.kernels import window_scores_ref

from infmllm_ros.cache import CacheConfig, Candidates
from infmllm_ros.cache.policies import make_policy


def _cands(window, accumulated=None, chunk=None, chunk_now=3):
    window = torch.tensor(window, dtype=torch.float32)
    n = window.shape[-1]
    return Candidates(window, torch.tensor(accumulated, dtype=torch.float32) if accumulated else window * 0,
                      torch.arange(n).expand_as(window), torch.tensor(chunk) if chunk else torch.zeros_like(window,
                      dtype=torch.long), chunk_now)  # fmt: skip


def _policy(**kw):
    return make_policy(CacheConfig(**{"budget": 4, "recent": 1, "sinks": 0, "bias": "none", **kw}))


def test_saddle_keeps_recent_plus_top_scores_in_temporal_order_per_head():
    c = _cands([[0.9, 0.1, 0.8, 0.2, 0.7, 0.0, 0.05], [0.0, 0.6, 0.1, 0.5, 0.1, 0.4, 0.0]])
    keep = _policy(policy="saddle").keep(c)
    assert keep.tolist() == [[0, 2, 4, 6], [1, 3, 5, 6]]  # top-3 by score + the newest, sorted, per head
    assert _policy(policy="saddle", sinks=1, recent=2).keep(c).tolist() == [[0, 2, 5, 6], [0, 1, 5, 6]]


def test_biases_tilt_toward_newer_tokens():
    flat = _cands([[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]], chunk=[[0, 0, 1, 1, 2, 2, 3]])
    assert _policy(policy="saddle", bias="linear", bias_strength=1.0).keep(flat).tolist() == [[3, 4, 5, 6]]
    old_winner = _cands([[0.7, 0.1, 0.5, 0.1, 0.45, 0.1, 0.1]], chunk=[[0, 0, 1, 1, 2, 2, 3]])
    assert _policy(policy="saddle").keep(old_winner).tolist() == [[0, 2, 4, 6]]
    decayed = _policy(policy="saddle", bias="age_decay", bias_strength=1.0).keep(old_winner)
    assert decayed.tolist() == [[2, 4, 5, 6]]  # 0.7 e^-3 = 0.035 < 0.1 e^-1 = 0.037: the old winner goes
    assert _policy(policy="saddle", bias="linear", bias_strength=0.0).keep(old_winner).tolist() == [[0, 2, 4, 6]]


def test_streaming_llm_and_h2o_and_full():
    c = _cands([[0.9, 0.1, 0.8, 0.2, 0.7, 0.0, 0.05]], accumulated=[[5.0, 0.1, 0.2, 3.0, 0.3, 0.1, 0.0]])
    assert _policy(policy="streaming_llm", sinks=1, recent=0).keep(c).tolist() == [[0, 4, 5, 6]]
    assert _policy(policy="h2o", recent=2).keep(c).tolist() == [[0, 3, 5, 6]]
    assert _policy(policy="full").keep(c) is None
    assert _policy(policy="saddle", budget=7).keep(c) is None  # everything fits


def test_scores_handed_to_the_cache_are_the_window_scores_of_the_model():
    model = tiny_lm("qwen2")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, VOCAB, (1, 9), generator=g), torch.randint(0, VOCAB, (1, 6), generator=g)
    saddle = make_cache(model, policy="saddle", budget=64, recent=2, window=4, max_chunk=16, max_new_tokens=1)
    stream(model, saddle, [(a, True), (b, True)])
    q, k = layer0_qk(model, torch.cat([a, b], 1), torch.arange(15)[None])
    want = window_scores_ref(q[:, :, -4:], k, 16**-0.5)[0]  # last W queries of chunk 2, every key
    assert (saddle.layers[0].window[:, :15] - want).abs().max().item() < 1e-6

    h2o = make_cache(model, policy="h2o", budget=64, recent=2, max_chunk=16, max_new_tokens=1)
    d = torch.randint(0, VOCAB, (1, 1), generator=g)
    stream(model, h2o, [(a, True), (d, False), (b, True)])
    q, k = layer0_qk(model, torch.cat([a, d, b], 1), torch.arange(16)[None])
    want = torch.zeros(2, 16)
    for lo, hi in ((0, 9), (9, 10), (10, 16)):  # every step, decode included: raw column sums, accumulated
        want[:, :hi] += window_scores_ref(q[:, :, lo:hi], k[:, :, :hi], 16**-0.5, normalize=False)[0]
    assert (h2o.layers[0].accumulated[:, :16] - want).abs().max().item() < 1e-5

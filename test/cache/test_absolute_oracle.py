"""Check of truth 2: absolute positions with eviction == a full forward that hides exactly the evicted tokens.

The cache reports which tokens it held before each forward (kept_indices); the oracle is a plain-torch eager
attention over the whole sequence with that visibility per layer and KV head, or, for StreamingLLM (same tokens in
every layer and head), the stock SDPA model with one 4D mask.
"""

import pytest
import torch
from cache_helpers import all_ids, make_cache, oracle_forward, script, stream, tiny_lm, visibility


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return tiny_lm(request.param)


CASES = {
    "saddle-linear": dict(policy="saddle", bias="linear", bias_strength=1.0),
    "saddle-age": dict(policy="saddle", bias="age_decay", bias_strength=0.5, sinks=1),
    "saddle-nobias": dict(policy="saddle", bias="none"),
    "h2o": dict(policy="h2o"),
    "streaming_llm": dict(policy="streaming_llm", sinks=2),
}


@pytest.mark.parametrize("case", CASES)
def test_absolute_eviction_equals_masked_full_forward(model, case):
    steps = script(chunks=(12, 9, 14, 8, 11), decode=3)
    cache = make_cache(model, budget=10, recent=3, window=5, positions="absolute", max_chunk=16, max_new_tokens=4,
                       **{"sinks": 0, **CASES[case]})  # fmt: skip
    record = []
    got = stream(model, cache, steps, record)
    assert cache.evictions == 5
    ids = all_ids(steps)
    cfg = model.config
    vis = visibility(steps, record, cfg.num_hidden_layers, cfg.num_key_value_heads)
    want = oracle_forward(model, ids, vis)
    assert (got - want).abs().max().item() < 1e-5
    with torch.no_grad():
        unmasked = model(input_ids=ids).logits
    assert (got - unmasked).abs().max().item() > 1e-3  # eviction really happened and mattered
    # the cache's reported positions are the stream positions of what it kept
    assert torch.equal(cache.kept_positions(), cache.kept_indices())


def test_streaming_llm_equals_sdpa_with_a_4d_mask(model):
    steps = script(chunks=(12, 9, 14), decode=2)
    cache = make_cache(model, policy="streaming_llm", budget=9, sinks=2, recent=0, positions="absolute",
                       max_chunk=16, max_new_tokens=4)  # fmt: skip
    record = []
    got = stream(model, cache, steps, record)
    vis = visibility(steps, record, model.config.num_hidden_layers, model.config.num_key_value_heads)
    assert (vis == vis[0, 0]).all()  # one set for every layer and head
    mask = torch.zeros(vis.shape[-2:]).masked_fill(~vis[0, 0], float("-inf"))[None, None]
    with torch.no_grad():
        want = model(input_ids=all_ids(steps), attention_mask=mask).logits
    assert (got - want).abs().max().item() < 1e-5
    kept = cache.kept_indices()[0, 0]
    assert kept[:2].tolist() == [0, 1] and kept[2:].tolist() == list(range(cache.seen - cache.stored + 2, cache.seen))

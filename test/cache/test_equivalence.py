"""Check of truth 1: with budget >= stream, chunked streaming through BoundedCache == one full forward."""

import pytest
import torch
from cache_helpers import all_ids, make_cache, script, stream, tiny_lm

POLICIES = ["saddle", "streaming_llm", "h2o", "full"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return tiny_lm(request.param)


@pytest.mark.parametrize("positions", ["reindex", "absolute"])
@pytest.mark.parametrize("policy", POLICIES)
def test_chunked_stream_equals_full_forward(model, policy, positions):
    steps = script()
    cache = make_cache(model, policy=policy, budget=64, recent=4, window=4, sinks=2, positions=positions,
                       max_chunk=16, max_new_tokens=4)  # fmt: skip
    got = stream(model, cache, steps)
    ids = all_ids(steps)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5
    assert cache.seen == ids.shape[1] == cache.stored
    assert cache.evictions == 0 and cache.next_position == ids.shape[1]

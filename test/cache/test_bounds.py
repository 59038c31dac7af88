"""Check of truth 6: stored never exceeds the budget after an eviction, seen == tokens fed, sinks and recent tokens
always kept, every layer stores the same count, and a 100,000-token stream keeps the cache's memory flat."""

import pytest
import torch
from cache_helpers import VOCAB, make_cache, stream, tiny_lm


@pytest.fixture(scope="module")
def model():
    return tiny_lm("llama")


@pytest.mark.parametrize("positions", ["reindex", "absolute"])
@pytest.mark.parametrize("policy", ["saddle", "streaming_llm", "h2o"])
def test_invariants_over_a_random_stream(model, policy, positions):
    g = torch.Generator().manual_seed(3)
    budget, recent, sinks = 12, 4, 2
    cache = make_cache(model, policy=policy, budget=budget, recent=recent, sinks=sinks, window=3,
                       positions=positions, max_chunk=9, max_new_tokens=3)  # fmt: skip
    fed = 0
    for _ in range(12):
        q = int(torch.randint(1, 10, (1,), generator=g))
        steps = [(torch.randint(0, VOCAB, (1, q), generator=g), True)]
        steps += [(torch.randint(0, VOCAB, (1, 1), generator=g), False) for _ in range(int(fed % 4 != 0) * 3)]
        stream(model, cache, steps[:1])  # prefill + end_chunk
        fed += q
        index = cache.kept_indices()  # [layers, H, stored]
        assert cache.seen == fed and cache.stored == min(fed, cache.stored) <= budget
        assert all(layer.stored == cache.stored and layer.seen == fed for layer in cache.layers)
        assert (index.diff(dim=-1) > 0).all()  # temporal order
        assert set(range(min(sinks, fed))) <= set(index[..., :sinks].unique().tolist())
        want_recent = torch.arange(max(fed - recent, 0), fed)
        assert (index[..., -want_recent.numel() :] == want_recent).all()
        if positions == "reindex":
            assert cache.next_position <= budget + 9
        stream(model, cache, steps[1:])
        fed += len(steps) - 1
    assert cache.evictions > 5


def test_hundred_thousand_tokens_keep_memory_flat():
    model = tiny_lm("llama", layers=1)
    chunk, total = 2048, 100_352
    cache = make_cache(model, policy="saddle", budget=256, recent=64, window=32, sinks=4, max_chunk=chunk,
                       max_new_tokens=0)  # fmt: skip
    ptrs = [(la.keys.data_ptr(), la.values.data_ptr()) for la in cache.layers]
    kv_bytes, g = cache.kv_bytes, torch.Generator().manual_seed(0)
    assert cache.read_copy and kv_bytes == cache.kv_bytes_for(cache.config, model.config, torch.float32, True)
    for _ in range(total // chunk):
        stream(model, cache, [(torch.randint(0, VOCAB, (1, chunk), generator=g), True)])
        assert cache.stored == 256 and cache.kv_bytes == kv_bytes and cache.next_position == 256
    assert cache.seen == total and cache.get_seq_length() == total
    assert ptrs == [(la.keys.data_ptr(), la.values.data_ptr()) for la in cache.layers]  # never reallocated
    assert cache.kept_indices()[..., :4].unique().tolist() == [0, 1, 2, 3]
    stats = cache.stats()
    assert stats == {"seen": total, "stored": 256, "budget": 256, "capacity": 256 + chunk, "kv_bytes": kv_bytes,
                     "evictions": total // chunk, "next_position": 256, "policy": "saddle"}  # fmt: skip

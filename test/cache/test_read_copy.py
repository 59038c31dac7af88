"""The read copy of the keys (CPU default): attention reads keys turned once per layer after each eviction instead of
at every forward. It must read exactly what rotate-on-read (the CUDA default) reads, bit for bit, in 1-D RoPE and in
M-RoPE streams whose rows moved apart; a decode step must not turn anything; its bytes are accounted."""

import pytest
import torch
from cache_helpers import make_cache, script, stream, tiny_lm
from test_mrope_rows import _feed, _model, _wide_chunk
from torch.utils._python_dispatch import TorchDispatchMode

from infmllm_ros.cache import BoundedCache


@pytest.mark.parametrize("policy", ["saddle", "h2o", "streaming_llm"])
def test_read_copy_reads_exactly_what_rotate_on_read_reads(policy):
    model = tiny_lm("llama", layers=2, kv_heads=2)
    steps = script(chunks=(12, 9, 14, 8, 11), decode=3)
    caches = [make_cache(model, read_copy=rc, policy=policy, budget=10, recent=3, window=0, sinks=1, bias="none",
                         max_chunk=16, max_new_tokens=4) for rc in (True, False)]  # fmt: skip
    assert [c.read_copy for c in caches] == [True, False]
    got = [stream(model, c, steps) for c in caches]
    assert caches[0].evictions >= 4
    assert torch.equal(got[0], got[1])
    for la, lb in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(la.current_keys(), lb.current_keys())


def test_read_copy_equals_rotate_on_read_after_row_by_row_squeezes():
    model = _model(kv_heads=2, layers=2, sections=(8, 12, 12))
    caches = [make_cache(model, read_copy=rc, policy="saddle", budget=6, recent=1, bias="none", window=0,
                         max_chunk=16, max_new_tokens=0) for rc in (True, False)]  # fmt: skip
    outs = [[], []]
    for c in range(6):
        for i, cache in enumerate(caches):
            ids, pos = _wide_chunk(cache.next_position, 11, c % 2 == 0, torch.Generator().manual_seed(c))
            outs[i].append(_feed(model, cache, ids, pos))
    assert caches[0].row_squeezes >= 1
    assert torch.equal(torch.cat(outs[0], 1), torch.cat(outs[1], 1))
    assert torch.equal(caches[0].layers[1].current_keys(), caches[1].layers[1].current_keys())


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_a_decode_step_turns_no_key_with_the_read_copy_and_the_bytes_are_counted():
    model = tiny_lm("llama", layers=2, kv_heads=2)
    for read_copy in (True, False):
        cache = make_cache(model, read_copy=read_copy, policy="saddle", budget=10, recent=3, window=0,
                           max_chunk=16, max_new_tokens=4)  # fmt: skip
        stream(model, cache, script(chunks=(12, 9), decode=1))  # evicted after each chunk; a decode step rebuilt it
        assert cache.evictions == 2 and not cache.layers[0].stale
        layer = cache.layers[0]
        cache.begin_forward(torch.tensor([[cache.next_position]]), prefill=False)
        with _Ops() as ops:
            layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
        turned = any(name.startswith(("cos", "sin")) for name in ops.names)
        assert turned != read_copy, ops.names  # rotate-on-read turns every stored key at every step
        one = 2 * 2 * cache.config.capacity * 16 * 4  # layers x kv_heads x slots x head_dim x fp32
        assert cache.kv_bytes == (3 if read_copy else 2) * one
        assert cache.kv_bytes == BoundedCache.kv_bytes_for(cache.config, model.config, torch.float32, read_copy)


@torch.no_grad()
def test_keys_and_offsets_written_from_outside_are_read_after_invalidate():
    """A restored snapshot writes keys, offsets and positions directly: after invalidate_read_keys() attention reads
    the restored keys turned by the restored offsets (a second cache that never moved away is the oracle)."""
    model = tiny_lm("llama", layers=1, kv_heads=2)
    steps = script(chunks=(12, 9, 14, 8), decode=0)
    cache, twin = (make_cache(model, policy="saddle", budget=10, recent=3, window=0, max_chunk=16, max_new_tokens=0)
                   for _ in range(2))  # fmt: skip
    stream(model, cache, steps[:2])
    stream(model, twin, steps[:2])
    saved = {name: getattr(cache, name).clone() for name in ("keys", "values", "offset", "pos")}
    stream(model, cache, steps[2:])
    for name, value in saved.items():
        getattr(cache, name).copy_(value)
    cache.invalidate_read_keys()
    assert torch.equal(cache.layers[0].current_keys(), twin.layers[0].current_keys())

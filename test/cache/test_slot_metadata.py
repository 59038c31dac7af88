"""The new slots' metadata (positions, offsets, stream indices, chunk numbers, scores) is written once per forward
for every layer, not once per layer: a GPU decode step is launch-bound (docs/bench/gpu_check.json, H200: about
1,100 launches per step of a 28-layer model). Checked by counting dispatched ops and against a plain bookkeeping of
what was fed."""

import torch
from transformers import LlamaConfig

from infmllm_ros.bench.cache_cost import _OpCounter
from infmllm_ros.cache import BoundedCache, CacheConfig


def _cache(layers: int, read_copy: bool = False) -> BoundedCache:
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=layers)
    config = CacheConfig(policy="saddle", budget=32, recent=8, window=0, sinks=4, max_chunk=16, max_new_tokens=4)
    return BoundedCache(config, cfg, "cpu", torch.float32, read_copy=read_copy)


def _update_ops(layers: int, read_copy: bool) -> int:
    cache, k = _cache(layers, read_copy), torch.randn(1, 2, 1, 16)
    cache.begin_forward(torch.tensor([[0]]), prefill=False)
    with _OpCounter() as ops:
        for layer in cache.layers:
            layer.update(k, k)
    return ops.ops


def test_each_layer_adds_only_its_own_key_and_value_writes():
    for read_copy, per_layer in ((False, 6), (True, 8)):  # K, V (+ the read copy): a slice and a copy each
        grow = (_update_ops(8, read_copy) - _update_ops(2, read_copy)) / 6
        assert grow <= per_layer, (read_copy, grow)  # writing metadata per layer cost 29 / 31 ops per layer


def test_every_layer_records_what_was_fed():
    cache, fed = _cache(3), []  # fed: (position, chunk number) per token, in order
    k = torch.randn(1, 2, 5, 16)
    for chunk, start in enumerate((0, 5, 10), start=1):
        pos = torch.arange(start, start + 5)[None]
        cache.begin_forward(pos, prefill=True)
        for layer in cache.layers:
            layer.update(k, k)
        fed += [(p, chunk) for p in pos[0].tolist()]
    n = cache.stored
    assert n == 15
    for i in range(len(cache.layers)):  # every layer and head: no eviction yet, so slots = tokens fed, in order
        assert cache.index[i, :, :n].tolist() == [list(range(n))] * 2
        assert cache.pos[i, :, :n, 0].tolist() == [[p for p, _ in fed]] * 2
        assert cache.chunk[i, :, :n].tolist() == [[c for _, c in fed]] * 2
        assert not cache.offset[i, :, :n].any() and not cache.window[i, :, :n].any()

"""Bad configs and bad use fail early with a clear message."""

import pytest
import torch
from cache_helpers import make_cache, tiny_lm
from transformers import Qwen2Config

from infmllm_ros.cache import BoundedCache, CacheConfig


@pytest.mark.parametrize("kwargs,match", [
    (dict(recent=80, budget=64), r"recent \(80\) > budget \(64\)"),
    (dict(budget=64, recent=60, sinks=8), r"budget \(64\) < sinks \+ recent"),
    (dict(window=-1), "window must be >= 0"),
    (dict(budget=0, recent=0), "budget must be >= 1"),
    (dict(max_chunk=0), "max_chunk must be >= 1"),
    (dict(policy="lru"), "unknown policy 'lru'"),
    (dict(bias="quadratic"), "unknown bias 'quadratic'"),
    (dict(positions="relative"), "unknown positions mode"),
    (dict(bias_strength=-1.0), "bias_strength must be >= 0"),
    (dict(sinks=-1), "sinks must be >= 0"),
    (dict(policy="streaming_llm", budget=4, sinks=4, recent=0), "sinks"),
])  # fmt: skip
def test_bad_config_fails_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(**kwargs)


def test_good_config_and_capacity():
    cfg = CacheConfig(budget=100, recent=10, sinks=4, max_chunk=50, max_new_tokens=8)
    assert cfg.capacity == 158


def test_bad_use_fails_with_a_clear_message():
    model = tiny_lm("llama")
    cache = make_cache(model, policy="saddle", budget=8, recent=2, window=2, max_chunk=6, max_new_tokens=1)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="begin_forward"):
        model(input_ids=ids, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="max_chunk"):
        cache.begin_forward(torch.arange(7)[None], prefill=True)
    cache.begin_forward(torch.arange(4)[None], prefill=True)
    model(input_ids=ids, position_ids=torch.arange(4)[None], cache=cache, use_cache=True)  # no forward_kwargs
    with pytest.raises(RuntimeError, match="forward_kwargs"):
        cache.end_chunk()
    cache.begin_forward(torch.tensor([[4]]), prefill=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        cache.begin_forward(torch.tensor([[5]]), prefill=False)
    with pytest.raises(ValueError, match="position row"):
        cache.begin_forward(torch.zeros(3, 1, 4, dtype=torch.long), prefill=True)
    sliding = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                          use_sliding_window=True, sliding_window=16, max_window_layers=0)  # fmt: skip
    with pytest.raises(ValueError, match="full-attention"):
        BoundedCache(CacheConfig(), sliding)


def test_full_policy_says_when_the_stream_outgrows_it():
    model = tiny_lm("llama")
    cache = make_cache(model, policy="full", budget=8, recent=0, max_chunk=6, max_new_tokens=0)
    for start in (0, 6, 12):
        cache.begin_forward(torch.arange(start, start + 6)[None], prefill=True)
        if start == 12:  # 12 stored + 6 > 8 + 6 + 0
            with pytest.raises(RuntimeError, match="exceed the capacity 14"):
                model(input_ids=torch.zeros(1, 6, dtype=torch.long), cache=cache, use_cache=True,
                      position_ids=torch.arange(start, start + 6)[None], **cache.forward_kwargs())  # fmt: skip
        else:
            model(input_ids=torch.zeros(1, 6, dtype=torch.long), cache=cache, use_cache=True,
                  position_ids=torch.arange(start, start + 6)[None], **cache.forward_kwargs())  # fmt: skip
        cache.end_chunk()
    assert BoundedCache.kv_bytes_for(cache.config, model.config, torch.float16) == 2 * 2 * 2 * 14 * 16 * 2

"""Automatic cache sizes (memory.size_cache): oracle = the arithmetic of docs/MODELS.md done by hand here."""

import pytest
from transformers import Qwen2VLConfig

from infmllm_ros.cache import CacheConfig
from infmllm_ros.engine import memory
from infmllm_ros.ros import session_factory

# Qwen2-VL-2B text shape: 28 layers, 2 KV heads, head_dim 128 -> 2*28*2*128 = 14336 elements per token
QWEN2VL_2B = Qwen2VLConfig(text_config=dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                            num_key_value_heads=2, max_position_embeddings=32768, vocab_size=100))
BF16_PER_TOKEN = 2 * 28 * 2 * 128 * 2
KW = dict(policy="saddle", recent=64, sinks=0, max_new_tokens=64, budget=0, max_chunk=0, window=0)


def size(kw=KW, **over):
    import torch

    args = dict(tokens_per_frame=234, max_frame_tokens=260, budget_frames=8, model_config=QWEN2VL_2B,
                dtype=torch.bfloat16, device="cpu")
    args.update(over)
    return memory.size_cache(dict(kw), **args)


def test_cpu_budget_is_frames_times_tokens_and_chunk_is_largest_frame():
    out = size()
    assert out["max_chunk"] == 260 and out["budget"] == 8 * 234 and "window" not in out
    CacheConfig(**out)  # valid as it stands
    assert size(max_frame_tokens=40)["max_chunk"] == memory.INSTRUCTION_TOKENS  # instructions still fit
    assert size(tokens_per_frame=20)["budget"] == memory.MIN_AUTO_BUDGET


def test_explicit_values_are_kept():
    out = size(dict(KW, budget=1000, max_chunk=300, window=16))
    assert (out["budget"], out["max_chunk"], out["window"]) == (1000, 300, 16)


def test_budget_capped_by_max_position_embeddings():
    out = size(budget_frames=1000)
    assert out["budget"] == 32768 - 260 - 64


def test_cuda_budget_fits_free_memory_after_weights(monkeypatch):
    free = 6 * 2**30
    monkeypatch.setattr(memory, "free_bytes", lambda device: free)
    out = size(device="cuda")
    usable = free * 0.9 - 2**30
    assert out["budget"] == min(int(usable // BF16_PER_TOKEN) - 260 - 64, 32768 - 260 - 64)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2**30 + 100 * BF16_PER_TOKEN)
    with pytest.raises(memory.InsufficientMemoryError, match="cache.budget 0"):
        size(device="cuda")


def test_errors_name_the_node_parameter_and_a_value_that_works():
    with pytest.raises(ValueError, match="cache.budget_frames") as e:
        size(dict(KW, recent=600), tokens_per_frame=60, budget_frames=2)
    need = int(str(e.value).split("cache.budget_frames to ")[1].split()[0])
    CacheConfig(**size(dict(KW, recent=600), tokens_per_frame=60, budget_frames=need))  # the suggested value works


def test_dtype_parameter():
    import torch
    from transformers import AutoConfig

    half = AutoConfig.for_model("llava", dtype="float16")
    assert session_factory.torch_dtype("auto", "cuda", half) is torch.float16  # the checkpoint's own half type
    assert session_factory.torch_dtype("auto", "cpu", half) is torch.float32
    assert session_factory.torch_dtype("bfloat16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="parameter 'dtype'"):
        session_factory.torch_dtype("fp8", "cpu")

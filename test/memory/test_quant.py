"""int8 per-channel quantization: the error vs the fp32 input stays within the documented scale / 2."""

import pytest
import torch

from infmllm_ros.memory.quant import dequantize, quantize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_within_half_scale(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 2, 37, 16, generator=g) * torch.logspace(-3, 2, 16)).to(dtype)  # wide channel ranges
    q, scale = quantize(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 2, 1, 16)
    ref = x.float()  # torch reference: the input itself
    err = (ref - dequantize(q, scale)).abs()
    bound = scale.float() / 2
    assert bool((err <= bound * (1 + 1e-5) + 1e-30).all()), float((err - bound).max())
    # the scale is not wasteful: at most one fp16 step above amax / 127 (so the bound is tight)
    amax = ref.abs().amax(dim=2, keepdim=True)
    assert bool((scale.float() >= amax / 127).all())
    assert bool((scale.float() <= amax / 127 * (1 + 2e-3) + 6e-8).all())


def test_zero_channel_is_exact():
    x = torch.randn(1, 1, 5, 4)
    x[..., 2] = 0
    q, scale = quantize(x)
    assert float(scale[..., 2]) == 0.0
    assert bool((dequantize(q, scale)[..., 2] == 0).all())


def test_tiny_values_not_flushed():
    x = torch.full((1, 1, 3, 2), 1e-6)
    q, scale = quantize(x)
    assert bool((dequantize(q, scale) - x).abs().le(scale.float() / 2 * (1 + 1e-5)).all())

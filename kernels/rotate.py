"""Rotate-on-read: stored keys (rotated at the position the model gave them) turned to their current position.

k [H, n, D] (any float dtype), delta [H, n] int = current - original position (the same in every M-RoPE row, so
the plain rotation is exact for M-RoPE too), inv_freq [F] fp32. Rotate_half convention, computed in fp32, cast
back once: each key read is ONE rotation away from the model's own key, however many evictions it survived.
Dims past 2F (partial rotary) pass through. Returns a new tensor; the stored keys are never modified.
"""

from __future__ import annotations

import torch

from .compact import triton_ok


def rotate_keys_ref(k: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    f = inv_freq.numel()
    ang = delta.to(torch.float32)[..., None] * inv_freq.to(k.device, torch.float32)
    x = k.float()
    x1, x2 = x[..., :f], x[..., f : 2 * f]
    cos, sin = ang.cos(), ang.sin()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * f :]], -1).to(k.dtype)


def rotate_keys(k, delta, inv_freq) -> torch.Tensor:
    """Dispatch: Triton on CUDA, the torch reference elsewhere."""
    if k.is_cuda and triton_ok():
        from .rotate_triton import rotate_keys_triton

        return rotate_keys_triton(k, delta, inv_freq)
    return rotate_keys_ref(k, delta, inv_freq)

"""Rotate-on-read: stored keys (rotated at the position the model gave them) turned to their current position.

k [H, n, D] (any float dtype); delta = current - original position, either [H, n] (every frequency turns alike:
1-D RoPE, or M-RoPE when all rows moved together) or [H, n, rows] with freq_rows [F] long: frequency f turns by
delta[..., freq_rows[f]] (Qwen2-VL M-RoPE: the rotary frequencies are split into mrope_section pieces, piece i
reads position row i % 3; `cache.rope.freq_rows_of`). inv_freq [F] fp32. Rotate_half convention, computed in fp32,
cast back once: each key read is ONE rotation away from the model's own key, however many evictions it survived.
Dims past 2F (partial rotary) pass through. Returns a new tensor; the stored keys are never modified.
"""

from __future__ import annotations

import torch

from .dispatch import triton_ok


def delta_per_freq(k: torch.Tensor, delta: torch.Tensor, freq_rows, f: int) -> torch.Tensor:
    """delta as [H, n, 1] (one turn for every frequency) or [H, n, F] (per frequency), long; clear errors."""
    if delta.dim() == k.dim() - 1:
        return delta[..., None]
    if delta.dim() != k.dim():
        raise ValueError(f"rotate_keys: delta {tuple(delta.shape)} must be [H, n] or [H, n, rows] for k "
                         f"{tuple(k.shape)}")  # fmt: skip
    if freq_rows is None:
        if delta.shape[-1] != 1:
            raise ValueError(f"rotate_keys: delta with {delta.shape[-1]} position rows needs freq_rows")
        return delta
    if freq_rows.numel() != f:  # (row values are checked once, by the cache: no host sync here)
        raise ValueError(f"rotate_keys: freq_rows has {freq_rows.numel()} entries for {f} frequencies")
    return delta[..., freq_rows.to(delta.device)]


def rotate_keys_ref(k: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, freq_rows=None) -> torch.Tensor:
    f = inv_freq.numel()
    ang = delta_per_freq(k, delta, freq_rows, f).to(torch.float32) * inv_freq.to(k.device, torch.float32)
    x = k.float()
    x1, x2 = x[..., :f], x[..., f : 2 * f]
    cos, sin = ang.cos(), ang.sin()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * f :]], -1).to(k.dtype)


def rotate_keys(k, delta, inv_freq, freq_rows=None) -> torch.Tensor:
    """Dispatch: Triton on CUDA, the torch reference elsewhere."""
    if k.is_cuda and triton_ok():
        from .rotate_triton import rotate_keys_triton

        return rotate_keys_triton(k, delta, inv_freq, freq_rows)
    return rotate_keys_ref(k, delta, inv_freq, freq_rows)

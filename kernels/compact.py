"""Compaction + key re-rotation in place in the static buffer (torch reference).

k, v [H, cap, D] are one layer's buffers (batch 1); keep [H, m] holds, per KV head, the kept slots in increasing
order; they move to slots 0..m-1. delta [H, m] (int) is new_pos - old_pos of each kept token: its key is turned
by delta * inv_freq (rotate_half convention, fp32; dims past 2 * len(inv_freq) pass through). inv_freq=None: no
rotation (absolute positions). Every M-RoPE row moves by the same delta, which is the plain rotation.
"""

from __future__ import annotations

import torch


def compact_rerotate_ref(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, delta: torch.Tensor,
                         inv_freq: torch.Tensor | None) -> None:  # fmt: skip
    m = keep.shape[1]
    idx = keep[..., None].expand(-1, -1, k.shape[-1])
    kk, vv = k.gather(1, idx), v.gather(1, idx)  # gather copies, so the in-place write below is safe
    if inv_freq is not None:
        f = inv_freq.numel()
        ang = delta.to(torch.float32)[..., None] * inv_freq.to(k.device, torch.float32)
        x = kk.float()
        x1, x2 = x[..., :f], x[..., f : 2 * f]
        cos, sin = ang.cos(), ang.sin()
        kk = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * f :]], -1).to(k.dtype)
    k[:, :m] = kk
    v[:, :m] = vv


def compact_rerotate_(k, v, keep, delta, inv_freq) -> None:
    """Dispatch: Triton on CUDA, the torch reference elsewhere."""
    if k.is_cuda and _triton_ok():
        from .compact_triton import compact_rerotate_triton

        return compact_rerotate_triton(k, v, keep, delta, inv_freq)
    return compact_rerotate_ref(k, v, keep, delta, inv_freq)


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # a CUDA install without Triton falls back to the reference
        return False
    return True

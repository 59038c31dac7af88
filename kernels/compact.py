"""Compaction in place in the static buffers (torch reference).

k, v [R, cap, D] are the buffers of R = layers x KV heads rows (batch 1), stacked so one call compacts every layer;
keep [R, m] holds, per row, the kept slots in increasing order; they move to slots 0..m-1. Keys are moved, never
turned: they stay rotated at the position the model gave them, and are turned to their current position when read
(`rotate_keys`), so rounding never accumulates over evictions.
"""

from __future__ import annotations

import torch

from .dispatch import triton_ok


def compact_ref(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> None:
    m = keep.shape[1]
    idx = keep[..., None].expand(-1, -1, k.shape[-1])
    kk, vv = k.gather(1, idx), v.gather(1, idx)  # gather copies, so the in-place write below is safe
    k[:, :m] = kk
    v[:, :m] = vv


def compact_(k, v, keep) -> None:
    """Dispatch: Triton on CUDA, the torch reference elsewhere."""
    if k.is_cuda and triton_ok():
        from .compact_triton import compact_triton

        return compact_triton(k, v, keep)
    return compact_ref(k, v, keep)

"""Triton compaction + key re-rotation, in place. Same signature and result as `compact.compact_rerotate_ref`.

One program per KV head walks the kept slots in order, block by block. Safe in place because keep is increasing:
a block's sources are at or after its targets, and every later block's sources lie after this block's targets.
Barriers make each block load everything before anything is stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _compact_kernel(K, V, KEEP, DELTA, INV, M, D, F,
                    skh, skn, skd, svh, svn, svd,
                    ROTATE: tl.constexpr, BN: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    h = tl.program_id(0)
    rf = tl.arange(0, BF)
    rd = tl.arange(0, BD)
    fm = rf < F
    rest = 2 * F + rd  # dims past the rotary ones
    for start in range(0, M, BN):
        rs = start + tl.arange(0, BN)
        ok = rs < M
        src = tl.load(KEEP + h * M + rs, mask=ok, other=0)
        kb = K + h * skh + src[:, None] * skn
        vb = V + h * svh + src[:, None] * svn
        k1 = tl.load(kb + rf[None, :] * skd, mask=ok[:, None] & fm[None, :], other=0.0)
        k2 = tl.load(kb + (F + rf[None, :]) * skd, mask=ok[:, None] & fm[None, :], other=0.0)
        kr = tl.load(kb + rest[None, :] * skd, mask=ok[:, None] & (rest[None, :] < D), other=0.0)
        vv = tl.load(vb + rd[None, :] * svd, mask=ok[:, None] & (rd[None, :] < D), other=0.0)
        tl.debug_barrier()
        if ROTATE:
            d = tl.load(DELTA + h * M + rs, mask=ok, other=0).to(tl.float32)
            inv = tl.load(INV + rf, mask=fm, other=0.0)
            ang = d[:, None] * inv[None, :]
            c, s = tl.cos(ang), tl.sin(ang)
            x1, x2 = k1.to(tl.float32), k2.to(tl.float32)
            k1 = (x1 * c - x2 * s).to(k1.dtype)
            k2 = (x2 * c + x1 * s).to(k2.dtype)
        kt = K + h * skh + rs[:, None] * skn
        tl.store(kt + rf[None, :] * skd, k1, mask=ok[:, None] & fm[None, :])
        tl.store(kt + (F + rf[None, :]) * skd, k2, mask=ok[:, None] & fm[None, :])
        tl.store(kt + rest[None, :] * skd, kr, mask=ok[:, None] & (rest[None, :] < D))
        tl.store(V + h * svh + rs[:, None] * svn + rd[None, :] * svd, vv, mask=ok[:, None] & (rd[None, :] < D))
        tl.debug_barrier()


def compact_rerotate_triton(k, v, keep, delta, inv_freq) -> None:
    h, m = keep.shape
    d = k.shape[-1]
    rotate = inv_freq is not None
    f = inv_freq.numel() if rotate else 0
    inv = inv_freq.to(k.device, torch.float32).contiguous() if rotate else torch.zeros(1, device=k.device)
    keep = keep.contiguous()
    delta = delta.to(torch.int64).contiguous()
    _compact_kernel[(h,)](k, v, keep, delta, inv, m, d, f, *k.stride(), *v.stride(),
                          ROTATE=rotate, BN=32, BF=max(16, triton.next_power_of_2(max(f, 1))),
                          BD=max(16, triton.next_power_of_2(d)))  # fmt: skip

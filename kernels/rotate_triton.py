"""Triton rotate-on-read. Same signature and result as `rotate.rotate_keys_ref`: one program per (head, key block).
Each frequency reads its own position row's delta (M-RoPE sections); a plain [H, n] delta is one row, stride 0."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_kernel(K, DELTA, FROWS, INV, OUT, N, D, F, skh, skn, skd, sdh, sdn, sdr,
                   BN: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    h = tl.program_id(0)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rf = tl.arange(0, BF)
    rd = tl.arange(0, BD)
    ok = rn < N
    fm = ok[:, None] & (rf[None, :] < F)
    rest = 2 * F + rd  # dims past the rotary ones
    rm = ok[:, None] & (rest[None, :] < D)
    kb = K + h * skh + rn[:, None] * skn
    ob = OUT + (h * N + rn[:, None]) * D  # OUT is contiguous [H, N, D]
    x1 = tl.load(kb + rf[None, :] * skd, mask=fm, other=0.0)
    x2 = tl.load(kb + (F + rf[None, :]) * skd, mask=fm, other=0.0)
    xr = tl.load(kb + rest[None, :] * skd, mask=rm, other=0.0)
    row = tl.load(FROWS + rf, mask=rf < F, other=0)  # the position row each frequency turns by
    d = tl.load(DELTA + h * sdh + rn[:, None] * sdn + row[None, :] * sdr, mask=fm, other=0).to(tl.float32)
    inv = tl.load(INV + rf, mask=rf < F, other=0.0)
    ang = d * inv[None, :]
    c, s = tl.cos(ang), tl.sin(ang)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(ob + rf[None, :], (a * c - b * s).to(x1.dtype), mask=fm)
    tl.store(ob + F + rf[None, :], (b * c + a * s).to(x1.dtype), mask=fm)
    tl.store(ob + rest[None, :], xr, mask=rm)


def rotate_keys_triton(k, delta, inv_freq, freq_rows=None) -> torch.Tensor:
    h, n, d = k.shape
    f = inv_freq.numel()
    if delta.dim() == 2:
        delta = delta[..., None]
    if delta.dim() != 3 or tuple(delta.shape[:2]) != (h, n):
        raise ValueError(f"rotate_keys: delta {tuple(delta.shape)} must be [H, n] or [H, n, rows] for k {(h, n, d)}")
    if freq_rows is None:
        if delta.shape[-1] != 1:
            raise ValueError(f"rotate_keys: delta with {delta.shape[-1]} position rows needs freq_rows")
        freq_rows = torch.zeros(f, dtype=torch.int32, device=k.device)
    elif freq_rows.numel() != f:
        raise ValueError(f"rotate_keys: freq_rows has {freq_rows.numel()} entries for {f} frequencies")
    out = torch.empty(h, n, d, device=k.device, dtype=k.dtype)
    inv = inv_freq.to(k.device, torch.float32).contiguous()
    rows = freq_rows.to(k.device, torch.int32).contiguous()
    bn = 32
    _rotate_kernel[(h, triton.cdiv(n, bn))](k, delta, rows, inv, out, n, d, f, *k.stride(), *delta.stride(), BN=bn,
                                            BF=max(16, triton.next_power_of_2(max(f, 1))),
                                            BD=max(16, triton.next_power_of_2(d)))  # fmt: skip
    return out

"""Triton window scores: fused QK^T + causal softmax (chunk offset) + column sums per KV group.

Two passes, nothing of size W x N in memory: (1) per query row, the log-sum-exp over the keys it sees;
(2) per key block, exp(s - lse) summed over the window rows of every query head of the group.
Same signature and result as `window_scores.window_scores_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lse_kernel(Q, K, LSE, scaling, W, N, OFF, G, D,
                sqb, sqh, sqw, sqd, skb, skh, skn, skd,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    hq = tl.program_id(0)
    mb = tl.program_id(1)
    b = tl.program_id(2)
    hk = hq // G
    rm = mb * BM + tl.arange(0, BM)
    rd = tl.arange(0, BD)
    q = tl.load(Q + b * sqb + hq * sqh + rm[:, None] * sqw + rd[None, :] * sqd,
                mask=(rm[:, None] < W) & (rd[None, :] < D), other=0.0).to(tl.float32)  # fmt: skip
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    hi = tl.minimum(N, OFF + (mb + 1) * BM)  # no row of this block sees a key past this
    for start in range(0, hi, BN):
        rn = start + tl.arange(0, BN)
        k = tl.load(K + b * skb + hk * skh + rn[None, :] * skn + rd[:, None] * skd,
                    mask=(rn[None, :] < N) & (rd[:, None] < D), other=0.0).to(tl.float32)  # fmt: skip
        s = tl.dot(q, k, input_precision="ieee") * scaling
        s = tl.where((rn[None, :] <= OFF + rm[:, None]) & (rn[None, :] < N), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
    tl.store(LSE + (b * tl.num_programs(0) + hq) * W + rm, m_i + tl.log(l_i), mask=rm < W)


@triton.jit
def _colsum_kernel(Q, K, LSE, OUT, scaling, W, N, OFF, G, HQ, D,
                   sqb, sqh, sqw, sqd, skb, skh, skn, skd,
                   NORMALIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    hk = tl.program_id(0)
    nb = tl.program_id(1)
    b = tl.program_id(2)
    rn = nb * BN + tl.arange(0, BN)
    rd = tl.arange(0, BD)
    k = tl.load(K + b * skb + hk * skh + rn[None, :] * skn + rd[:, None] * skd,
                mask=(rn[None, :] < N) & (rd[:, None] < D), other=0.0).to(tl.float32)  # fmt: skip
    acc = tl.zeros([BN], tl.float32)
    m_start = (tl.maximum(nb * BN - OFF, 0) // BM) * BM  # earlier rows cannot see this key block
    for g in range(0, G):
        hq = hk * G + g
        for ms in range(m_start, W, BM):
            rm = ms + tl.arange(0, BM)
            q = tl.load(Q + b * sqb + hq * sqh + rm[:, None] * sqw + rd[None, :] * sqd,
                        mask=(rm[:, None] < W) & (rd[None, :] < D), other=0.0).to(tl.float32)  # fmt: skip
            lse = tl.load(LSE + (b * HQ + hq) * W + rm, mask=rm < W, other=0.0)
            s = tl.dot(q, k, input_precision="ieee") * scaling
            seen = (rn[None, :] <= OFF + rm[:, None]) & (rm[:, None] < W) & (rn[None, :] < N)
            acc += tl.sum(tl.where(seen, tl.exp(s - lse[:, None]), 0.0), 0)
    acc = acc / G
    if NORMALIZE:
        acc = acc / tl.maximum(W - tl.maximum(rn - OFF, 0), 1).to(tl.float32)
    tl.store(OUT + (b * tl.num_programs(0) + hk) * N + rn, acc, mask=rn < N)


def window_scores_triton(query: torch.Tensor, key: torch.Tensor, scaling: float, normalize: bool = True):
    b, hq, w, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    g, off = hq // hkv, n - w
    bm, bn, bd = 16, 32, max(16, triton.next_power_of_2(d))
    lse = torch.empty(b, hq, w, device=query.device, dtype=torch.float32)
    out = torch.empty(b, hkv, n, device=query.device, dtype=torch.float32)
    qs, ks = query.stride(), key.stride()
    _lse_kernel[(hq, triton.cdiv(w, bm), b)](query, key, lse, scaling, w, n, off, g, d, *qs, *ks,
                                             BM=bm, BN=bn, BD=bd)  # fmt: skip
    _colsum_kernel[(hkv, triton.cdiv(n, bn), b)](query, key, lse, out, scaling, w, n, off, g, hq, d, *qs, *ks,
                                                 NORMALIZE=normalize, BM=bm, BN=bn, BD=bd)  # fmt: skip
    return out

"""Triton window scores: fused QK^T + causal softmax (chunk offset) + column sums per KV group.

Two passes, nothing of size W x N in memory: (1) per query row, the log-sum-exp over the keys it sees;
(2) per key block, exp(s - lse) summed over the window rows of every query head of the group.
Same signature and result as `window_scores.window_scores_ref`.

Q and K enter the dot in their own dtype with an fp32 accumulator: for bf16/fp16 that is the tensor cores, and
still exact per product (an 8- or 11-bit mantissa squared fits fp32's 24 bits), so only the order of the sums
differs from the fp32 reference. fp32 inputs stay on "ieee" (TF32 would round them). Why: the first GPU run
(docs/bench/gpu_check.json, H200) upcast everything to fp32 on the CUDA cores with 16 x 32 tiles, and a bounded
prefill chunk took 15x plain SDPA's time; these dots are the largest extra work of that chunk (2 passes of W x N x D
per query head), though that run did not profile the prefill.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _lse_kernel(Q, K, LSE, scaling, W, N, OFF, G, D,
                sqb, sqh, sqw, sqd, skb, skh, skn, skd,
                UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    hq = tl.program_id(0)
    mb = tl.program_id(1)
    b = tl.program_id(2)
    hk = hq // G
    rm = mb * BM + tl.arange(0, BM)
    rd = tl.arange(0, BD)
    q = tl.load(Q + b * sqb + hq * sqh + rm[:, None] * sqw + rd[None, :] * sqd,
                mask=(rm[:, None] < W) & (rd[None, :] < D), other=0.0)  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    hi = tl.minimum(N, OFF + (mb + 1) * BM)  # no row of this block sees a key past this
    for start in range(0, hi, BN):
        rn = start + tl.arange(0, BN)
        k = tl.load(K + b * skb + hk * skh + rn[None, :] * skn + rd[:, None] * skd,
                    mask=(rn[None, :] < N) & (rd[:, None] < D), other=0.0)  # fmt: skip
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision="ieee", out_dtype=tl.float32) * scaling
        s = tl.where((rn[None, :] <= OFF + rm[:, None]) & (rn[None, :] < N), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
    tl.store(LSE + (b * tl.num_programs(0) + hq) * W + rm, m_i + tl.log(l_i), mask=rm < W)


@triton.jit
def _colsum_kernel(Q, K, LSE, OUT, scaling, W, N, OFF, G, HQ, D,
                   sqb, sqh, sqw, sqd, skb, skh, skn, skd,
                   NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BD: tl.constexpr):  # fmt: skip
    hk = tl.program_id(0)
    nb = tl.program_id(1)
    b = tl.program_id(2)
    rn = nb * BN + tl.arange(0, BN)
    rd = tl.arange(0, BD)
    k = tl.load(K + b * skb + hk * skh + rn[None, :] * skn + rd[:, None] * skd,
                mask=(rn[None, :] < N) & (rd[:, None] < D), other=0.0)  # fmt: skip
    if UPCAST:
        k = k.to(tl.float32)
    acc = tl.zeros([BN], tl.float32)
    m_start = (tl.maximum(nb * BN - OFF, 0) // BM) * BM  # earlier rows cannot see this key block
    for g in range(0, G):
        hq = hk * G + g
        for ms in range(m_start, W, BM):
            rm = ms + tl.arange(0, BM)
            q = tl.load(Q + b * sqb + hq * sqh + rm[:, None] * sqw + rd[None, :] * sqd,
                        mask=(rm[:, None] < W) & (rd[None, :] < D), other=0.0)  # fmt: skip
            if UPCAST:
                q = q.to(tl.float32)
            lse = tl.load(LSE + (b * HQ + hq) * W + rm, mask=rm < W, other=0.0)
            s = tl.dot(q, k, input_precision="ieee", out_dtype=tl.float32) * scaling
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
    if key.dtype != query.dtype:  # tl.dot takes one dtype
        key = key.to(query.dtype)
    # tensor-core tiles for 16-bit inputs; fp32 keeps small ones (registers); a short window (decode) keeps BM 16
    wide = query.dtype != torch.float32 and w > 16
    bm, bn, bd = 64 if wide else 16, 64 if query.dtype != torch.float32 else 32, max(16, triton.next_power_of_2(d))
    lse = torch.empty(b, hq, w, device=query.device, dtype=torch.float32)
    out = torch.empty(b, hkv, n, device=query.device, dtype=torch.float32)
    # Triton's CPU interpreter multiplies bf16 as raw bit patterns (its numpy has no bf16): upcast there only.
    # fp16 runs the native 16-bit path in the interpreter, so the tests still see these tiles and masks.
    upcast = query.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    qs, ks = query.stride(), key.stride()
    _lse_kernel[(hq, triton.cdiv(w, bm), b)](query, key, lse, scaling, w, n, off, g, d, *qs, *ks,
                                             UPCAST=upcast, BM=bm, BN=bn, BD=bd)  # fmt: skip
    _colsum_kernel[(hkv, triton.cdiv(n, bn), b)](query, key, lse, out, scaling, w, n, off, g, hq, d, *qs, *ks,
                                                 NORMALIZE=normalize, UPCAST=upcast, BM=bm, BN=bn, BD=bd)  # fmt: skip
    return out

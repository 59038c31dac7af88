"""Retrieval-window scores: per key, the softmax probability mass the window queries give it (torch reference).

query [B, H_q, W, D] = the last W queries of the forward; key [B, H_kv, N, D] = every key those queries attend to
(cache + chunk). Window query i sits at key index N - W + i and sees keys j <= N - W + i (causal with the chunk
offset). Scores are fp32, averaged over the query heads of each KV group (GQA), and, with normalize=True, divided
by the number of window queries that can see the key (Inf-MLLM "Sum & Average"). normalize=False gives the raw
column sum (H2O's per-step contribution).

Memory: the window can be the whole chunk (hundreds of image tokens) and N the whole cache, so the W x N logits are
never materialized: pass 1 runs a log-sum-exp per query row over key blocks, pass 2 sums exp(s - lse) per key block.
The largest temporary is [B, H_q, W, block] fp32 (`block_for` keeps it near SCORE_ELEMENTS); with a single block
it is one QK^T and a softmax, as the dense formula.
"""

from __future__ import annotations

import torch

from .dispatch import triton_ok

SCORE_ELEMENTS = 1 << 22  # fp32 elements of one block of logits (16 MiB): the peak temporary of the reference
MIN_BLOCK = 64


def block_for(heads: int, w: int, n: int) -> int:
    """Keys per block: as many as fit SCORE_ELEMENTS logits for the [heads x W] queries, at least MIN_BLOCK."""
    return max(1, min(n, max(MIN_BLOCK, SCORE_ELEMENTS // max(heads * w, 1))))


def window_scores_ref(query: torch.Tensor, key: torch.Tensor, scaling: float, normalize: bool = True,
                      block: int | None = None) -> torch.Tensor:  # fmt: skip
    b, hq, w, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    g, off = hq // hkv, n - w
    block = block or block_for(b * hq, w, n)
    q = query.float().reshape(b, hkv, g * w, d) * scaling  # [B, H_kv, G*W, D]: a group's heads share its keys
    rows = (torch.arange(w, device=query.device) + off).repeat(g)[:, None]  # each query row's own key index

    def logits(start: int) -> torch.Tensor:  # [B, H_kv, G*W, blk], -inf where the row cannot see the key
        k = key[:, :, start : start + block].float()
        s = q @ k.transpose(-1, -2)
        if start + k.shape[2] - 1 > off:  # only blocks reaching into the window have hidden keys
            cols = torch.arange(start, start + k.shape[2], device=query.device)[None, :]
            s = s.masked_fill(cols > rows, float("-inf"))
        return s

    starts = range(0, n, block)
    if len(starts) == 1:  # small enough for one block: one QK^T, a plain softmax
        col = logits(0).softmax(-1).sum(-2) / g
    else:
        lse = logits(0).logsumexp(-1)  # key 0 is visible to every row: finite from the first block on
        for start in starts[1:]:
            lse = torch.logaddexp(lse, logits(start).logsumexp(-1))
        col = torch.empty(b, hkv, n, device=query.device, dtype=torch.float32)
        for start in starts:
            s = logits(start)
            col[:, :, start : start + s.shape[-1]] = (s - lse[..., None]).exp_().sum(-2) / g
    if normalize:
        col = col / window_counts(w, n, query.device)
    return col


def window_counts(w: int, n: int, device) -> torch.Tensor:
    """How many of the W window queries see key j: W for old keys, fewer for keys inside the window."""
    j = torch.arange(n, device=device)
    return (w - (j - (n - w)).clamp(min=0)).clamp(min=1).float()


def window_scores(query: torch.Tensor, key: torch.Tensor, scaling: float, normalize: bool = True) -> torch.Tensor:
    """Dispatch: Triton on CUDA (fused, no W x N matrix), the torch reference elsewhere."""
    if query.is_cuda and triton_ok():
        from .window_scores_triton import window_scores_triton

        return window_scores_triton(query, key, scaling, normalize)
    return window_scores_ref(query, key, scaling, normalize)


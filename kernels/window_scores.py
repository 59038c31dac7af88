"""Retrieval-window scores: per key, the softmax probability mass the window queries give it (torch reference).

query [B, H_q, W, D] = the last W queries of the forward; key [B, H_kv, N, D] = every key those queries attend to
(cache + chunk). Window query i sits at key index N - W + i and sees keys j <= N - W + i (causal with the chunk
offset). Scores are fp32, averaged over the query heads of each KV group (GQA), and, with normalize=True, divided
by the number of window queries that can see the key (Inf-MLLM "Sum & Average"). normalize=False gives the raw
column sum (H2O's per-step contribution).
"""

from __future__ import annotations

import torch


def window_scores_ref(query: torch.Tensor, key: torch.Tensor, scaling: float, normalize: bool = True) -> torch.Tensor:
    b, hq, w, _ = query.shape
    hkv, n = key.shape[1], key.shape[2]
    g = hq // hkv
    off = n - w
    k = key.float().repeat_interleave(g, dim=1)
    logits = (query.float() @ k.transpose(-1, -2)) * scaling  # [B, H_q, W, N]: fine for a reference
    rows = torch.arange(w, device=query.device)[:, None] + off
    visible = torch.arange(n, device=query.device)[None, :] <= rows
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    col = probs.sum(-2).view(b, hkv, g, n).mean(2)
    if normalize:
        col = col / window_counts(w, n, query.device)
    return col


def window_counts(w: int, n: int, device) -> torch.Tensor:
    """How many of the W window queries see key j: W for old keys, fewer for keys inside the window."""
    j = torch.arange(n, device=device)
    return (w - (j - (n - w)).clamp(min=0)).clamp(min=1).float()


def window_scores(query: torch.Tensor, key: torch.Tensor, scaling: float, normalize: bool = True) -> torch.Tensor:
    """Dispatch: Triton on CUDA (fused, no W x N matrix), the torch reference elsewhere."""
    if query.is_cuda and _triton_ok():
        from .window_scores_triton import window_scores_triton

        return window_scores_triton(query, key, scaling, normalize)
    return window_scores_ref(query, key, scaling, normalize)


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # a CUDA install without Triton falls back to the reference
        return False
    return True

"""Next-token choice: masks (suppressed / allowed ids), greedy, temperature + top-p with a seeded generator."""

from __future__ import annotations

import torch


def mask_logits(logits: torch.Tensor, suppress: torch.Tensor | None, allowed: list[int] | None,
                mask_fn=None) -> torch.Tensor:
    """logits (V,) fp32 -> masked copy; `allowed` (if given) wins over everything else except `suppress`.
    `mask_fn(out)` (a grammar bitmask) sets forbidden logits of the copy to -inf in place."""
    out = logits.float().clone()
    if mask_fn is not None:
        mask_fn(out)
    if allowed is not None:
        keep = torch.full_like(out, float("-inf"))
        idx = torch.as_tensor(list(allowed), dtype=torch.long, device=out.device)
        keep[idx] = out[idx]
        out = keep
    if suppress is not None and suppress.numel():
        out[suppress] = float("-inf")
    # the max is finite iff some logit is (cheap at 128K+); only an inf/nan max needs the full check
    if not bool(torch.isfinite(out.max())) and not torch.isfinite(out).any():
        raise RuntimeError("every token is masked: allowed_tokens_fn and the suppressed ids leave nothing")
    return out


def penalize_repeats(logits: torch.Tensor, previous: list[int], penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor over `previous` (this answer's tokens; HF also counts the
    prompt, which here is the whole stream): positive logits / penalty, negative ones * penalty. In place."""
    if penalty == 1.0 or not previous:
        return logits
    idx = torch.as_tensor(sorted(set(previous)), dtype=torch.long, device=logits.device)
    picked = logits[idx]
    logits[idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def choose(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None, top_k: int = 0) -> int:
    """Greedy when temperature <= 0; else sample from softmax(logits / T) within the top-k (0 = all) tokens and
    the top-p nucleus."""
    if temperature <= 0.0:  # numpy's argmax: ~25x faster than torch's over a 128K CPU vector; same first-max rule
        return int(logits.numpy().argmax()) if logits.device.type == "cpu" else int(torch.argmax(logits))
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = cum - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))

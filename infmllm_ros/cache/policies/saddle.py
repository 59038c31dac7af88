"""Inf-MLLM saddle policy: recent tokens + top-k by the retrieval-window score of the newest chunk, after the
attention bias that tilts scores toward newer tokens (paper sections 2.3-2.5)."""

from dataclasses import dataclass

import torch

from .base import Candidates, Policy, register


def attention_bias(score: torch.Tensor, c: Candidates, form: str, strength: float) -> torch.Tensor:
    """linear:    s + strength * mean(s) * r, r = token's recency in [0, 1] among the candidates (scale-free).
    age_decay: s * exp(-strength * age), age = chunks since the token arrived."""
    if form == "none" or strength == 0:
        return score
    if form == "linear":
        idx = c.index.float()
        lo, hi = idx.min(-1, keepdim=True).values, idx.max(-1, keepdim=True).values
        recency = (idx - lo) / (hi - lo).clamp(min=1)
        return score + strength * score.mean(-1, keepdim=True) * recency
    if form == "age_decay":
        return score * torch.exp(-strength * (c.chunk_now - c.chunk).float())
    raise ValueError(f"unknown bias {form!r}")


@register("saddle")
@dataclass
class Saddle(Policy):
    window: int = 0  # 0 = the whole chunk (CacheConfig.window)
    bias: str = "linear"
    bias_strength: float = 1.0
    scores = "window"

    def score(self, c: Candidates):
        return attention_bias(c.window, c, self.bias, self.bias_strength)

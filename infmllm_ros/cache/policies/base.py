"""Policy base: a policy scores stored tokens; `keep` protects sinks + recent and takes the top-k of the rest.

Scores/compress split as in NVIDIA kvpress: a policy only says how much each token is worth (`score`), the shared
`select` turns that into kept slots. One call per layer, per chunk, per KV head (equal counts in every head).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

POLICIES: dict[str, type[Policy]] = {}


def register(name: str):
    """Class decorator: `@register("my_policy")` makes `CacheConfig(policy="my_policy")` find it."""

    def deco(cls):
        POLICIES[name] = cls
        cls.name = name
        return cls

    return deco


@dataclass
class Candidates:
    """One layer's stored tokens at eviction time, per KV head, in temporal order (slot s of head h)."""

    window: torch.Tensor  # [H, n] fp32: retrieval-window score from the last prefill (saddle)
    accumulated: torch.Tensor  # [H, n] fp32: attention summed over every step since arrival (h2o)
    index: torch.Tensor  # [H, n] int64: stream index of the token (tokens seen before it)
    chunk: torch.Tensor  # [H, n] int64: number of the prompt/chunk it arrived with
    chunk_now: int  # number of the current chunk

    @property
    def n(self) -> int:
        return self.index.shape[-1]


def select(score: torch.Tensor, c: Candidates, budget: int, recent: int, sinks: int) -> torch.Tensor:
    """Kept slots [H, budget], increasing: sinks + last `recent` + top-k of the rest by score."""
    n = c.n
    s = score.float().clone()
    protected = c.index < sinks
    protected[..., max(n - recent, 0) :] = True
    s[protected] = float("inf")
    return s.topk(budget, dim=-1).indices.sort(dim=-1).values


@dataclass
class Policy:
    budget: int
    recent: int = 0
    sinks: int = 0
    name: ClassVar[str] = ""
    scores: ClassVar[str] = "none"  # what attention must compute: "none" | "window" (prefill) | "every_step"

    @classmethod
    def from_config(cls, config) -> Policy:
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})

    def score(self, c: Candidates) -> torch.Tensor:
        raise NotImplementedError

    def keep(self, c: Candidates) -> torch.Tensor | None:
        """Kept slots [H, budget] in temporal order, or None when everything fits."""
        if c.n <= self.budget:
            return None
        return select(self.score(c), c, self.budget, self.recent, self.sinks)

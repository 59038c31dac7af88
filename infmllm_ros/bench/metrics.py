"""Perplexity summaries of a per-token NLL stream, comparison to the recompute reference, and the two detectors.

* flagged: the policy's overall perplexity is more than `FLAG_RATIO` (5 %) above the reference's at the same budget.
* collapsed: the known failure of a cache that runs past what the model can use (e.g. absolute RoPE positions
  beyond the trained context): in the last window the perplexity is at least `COLLAPSE_RATIO` x the reference's,
  or the policy's last/first-window growth is at least `COLLAPSE_RATIO` x the reference's growth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

FLAG_RATIO = 1.05
COLLAPSE_RATIO = 2.0


def ppl(nll) -> float:
    nll = np.asarray(nll, dtype=np.float64)
    return float(math.exp(nll.mean())) if nll.size else float("nan")


def window_ppl(nll, window: int) -> list[float]:
    """Perplexity of each consecutive `window` tokens (a shorter last window is merged into the one before)."""
    nll = np.asarray(nll, dtype=np.float64)
    n = max(1, len(nll) // window)
    edges = [i * window for i in range(n)] + [len(nll)]
    return [ppl(nll[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def window_edges(n_tokens: int, window: int) -> list[int]:
    n = max(1, n_tokens // window)
    return [i * window for i in range(n)] + [n_tokens]


def detect_collapse(windows: list[float], ref_windows: list[float], ratio: float = COLLAPSE_RATIO) -> bool:
    """True when the policy's perplexity runs away from the reference's over the stream (see module doc)."""
    if not windows or len(windows) != len(ref_windows):
        raise ValueError("window lists must be non-empty and of equal length")
    last = windows[-1] / ref_windows[-1]
    growth = (windows[-1] / windows[0]) / (ref_windows[-1] / ref_windows[0])
    return bool(last >= ratio or growth >= ratio or not math.isfinite(windows[-1]))


@dataclass
class Summary:
    policy: str
    budget: int | None
    tokens: int
    ppl: float
    windows: list[float]
    last_over_first: float
    ratio_to_reference: float | None = None
    window_ratios: list[float] | None = None
    flagged: bool | None = None
    collapsed: bool | None = None
    seconds: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(policy: str, budget, nll, window: int, ref_nll=None, seconds=None) -> Summary:
    """Summary of one policy's NLL; with ref_nll (the reference on the same tokens) the ratios and detectors."""
    w = window_ppl(nll, window)
    s = Summary(policy, budget, len(nll), ppl(nll), w, w[-1] / w[0], seconds=seconds)
    if ref_nll is not None:
        ref_nll = np.asarray(ref_nll)[:len(nll)]
        rw = window_ppl(ref_nll, window)
        s.ratio_to_reference = s.ppl / ppl(ref_nll)
        s.window_ratios = [a / b for a, b in zip(w, rw, strict=True)]
        s.flagged = bool(s.ratio_to_reference > FLAG_RATIO)
        s.collapsed = detect_collapse(w, rw)
    return s

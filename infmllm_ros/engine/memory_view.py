"""What the bounded cache still holds, per frame and per text turn, and what a question attended to (evidence).

The session keeps a `ChunkMap`: which stream indices (0 = first token fed since reset) came from which frame or text
turn. `memory(session)` joins it with the cache's stored stream indices (`kept_indices()`, [layers, heads, stored]);
`EvidenceProbe` collects, during a question's prefill only, the attention mass the question's queries put on every
stored key and sums it per frame / turn. Nothing here runs on the per-token decode path.

Evidence ranking (`EvidenceProbe.evidence`; the constants below were chosen with `infmllm-bench evidence` on world
seeds 16-27 and are reported on the held-out seeds 0-15): the softmax mass of the question's LAST `EVIDENCE_QUERIES`
queries (those that predict the answer) in the LATER half of the layers, summed per frame, times (held frames newer
than the frame + 1)**RECENCY, a mild correction of the attention's recency bias. One ranking for every question: no
question text is parsed and no current/past decision is made.

The embedded robot VLM is trained to ground that very mass (`infmllm-bench train-vlm --ground-weight`: the frames a
question is about get it), which is what makes the ranking point at the answer's source. Before (the same model
without the grounding loss, 2026-12-03), the top frame showed the asked object in 43 % / 39 % of held-out past
questions (budgets 128 / 512) with RECENCY 1.0 and a view gate over 4 fitted query heads that switched the
correction off for questions about the current view; none of the other signals tried on that model (the answer
tokens' mass, mass per stored token, per-frame maxima, opening-token baselines, neighbour smoothing, single heads,
a fitted per-(layer, head) weight, occlusion of each held frame, the queries at the asked object's word, mass
weighted by ||W_o v||, attention rollout) reached 45 % / 41 % on the tuning seeds. With the grounded model
(tuning seeds, budgets 128 / 512): RECENCY 0: 58 % / 49 %, current-view top = newest 100 % / 96 %; 0.25: 58 % /
52 %, 88 % / 92 %; 0.5: 58 % / 53 %, 23 % / 84 %; 1.0 with the old gate: 55 % / 52 %, 66 % / 68 %.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

TEXT_KINDS = ("system", "instruction", "answer", "text")
EXCERPT_CHARS = 40
TOP_FRAMES = 3
# Evidence ranking (see the module docstring; tuned on world seeds 16-27, reported on 0-15)
EVIDENCE_QUERIES = 4
RECENCY = 0.25


@dataclass
class Span:
    start: int  # first stream index
    end: int  # one past the last
    kind: str  # "frame" or one of TEXT_KINDS
    stamp: float | None = None  # frames: the stamp passed to observe()
    text: str = ""  # text turns: the instruction / answer text

    @property
    def fed(self) -> int:
        return self.end - self.start


class ChunkMap:
    """Spans of the stream in feeding order. `mark` records a chunk once it is fed; tokens fed in front of it (the
    system prompt after reset, an answer's unfed last token + closing text, flushed on the next chunk) belong to the
    turn before: the open answer, else a system / text span of their own."""

    def __init__(self, kept_fn=None, limit: int = 4096, system_text: str = ""):
        self.spans: list[Span] = []
        self._system_text = system_text
        self._kept_fn = kept_fn  # () -> [layers, heads, stored] stream indices, to drop fully evicted spans
        self._limit = limit

    def mark(self, kind: str, end: int, length: int, stamp: float | None = None, text: str = "") -> Span:
        start = end - length
        last = self.spans[-1].end if self.spans else 0
        if start > last:
            if self.spans and self.spans[-1].kind in ("answer", "system") and self.spans[-1].end == last:
                self.spans[-1].end = start
            else:
                first = not self.spans
                gap_kind, gap_text = ("system", self._system_text) if first else ("text", "")
                self.spans.append(Span(last, start, gap_kind, text=gap_text))
        span = Span(start, end, kind, stamp, text)
        self.spans.append(span)
        if len(self.spans) > self._limit and self._kept_fn is not None:
            self.prune(self._kept_fn())
        return span

    def span_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Span number of each stream index (same shape). Indices past the last span map to the last span."""
        starts = torch.tensor([s.start for s in self.spans], dtype=torch.long, device=indices.device)
        return (torch.bucketize(indices, starts, right=True) - 1).clamp(min=0)

    def counts(self, kept: torch.Tensor) -> torch.Tensor:
        """[spans, layers, heads]: stored tokens of each span, per layer and KV head."""
        n_layers, heads, _ = kept.shape
        out = torch.zeros(n_layers, heads, len(self.spans), dtype=torch.long, device=kept.device)
        if self.spans and kept.numel():
            out.scatter_add_(2, self.span_ids(kept), torch.ones_like(kept))
        return out.permute(2, 0, 1)

    def prune(self, kept: torch.Tensor) -> None:
        """Drop spans the cache holds no token of (evicted tokens never come back)."""
        if not self.spans:
            return
        held = self.counts(kept).flatten(1).sum(1) > 0
        held[-1] = True  # the newest span stays: the next chunk's gap may extend it
        self.spans = [s for s, h in zip(self.spans, held.tolist(), strict=True) if h]


def kept_indices(cache) -> torch.Tensor:
    """[layers, heads, stored] stream indices the cache holds (a never-evicting stand-in holds all it saw)."""
    if hasattr(cache, "kept_indices"):
        return cache.kept_indices().cpu()
    return torch.arange(int(cache.stored))[None, None]


def memory(session) -> dict:
    """The plain record behind `StreamingSession.memory()` and the ROS `~/memory` topic."""
    cache, cmap = session.cache, session.chunk_map
    kept = kept_indices(cache)
    stats = dict(cache.stats())
    budget = stats.get("budget") or int(cache.stored) or 1
    cmap.prune(kept)
    counts = cmap.counts(kept).float()  # [spans, layers, heads]
    frames, text = [], []
    for span, c in zip(cmap.spans, counts, strict=True):
        if not c.any():
            continue
        per_layer = c.mean(1)  # [layers]: every head of a layer stores the same count, not the same tokens
        row = {"fed": span.fed, "kept": round(float(per_layer.mean()), 3), "kept_min": int(c.min()),
               "kept_max": int(c.max()), "budget_share": round(float(per_layer.mean()) / budget, 4)}
        if span.kind == "frame":
            frames.append({"stamp": span.stamp, **row})
        else:
            text.append({"kind": span.kind, "excerpt": _excerpt(span.text), **row})
    totals = {"seen": int(stats.get("seen", cache.get_seq_length())), "stored": int(cache.stored),
              "budget": stats.get("budget"), "evictions": int(stats.get("evictions", 0)),
              "kv_bytes": int(stats.get("kv_bytes", 0)), "frames_seen": int(session.counters.frames_seen),
              "frames_held": len(frames), "text_turns_held": len(text), "policy": stats.get("policy")}
    return {"frames": frames, "text": text, "totals": totals}


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS - 1] + "\u2026"


class EvidenceProbe:
    """Called by the attention function for every text layer during ONE prefill (the question's). Keeps, per layer,
    the summed softmax mass the last `n_queries` queries give each key (the kernel the cache already uses for its
    window scores, unnormalised) and the keys' stream indices, read before the chunk's eviction."""

    def __init__(self, cache, n_queries: int):
        self.cache, self.n_queries = cache, n_queries
        self.parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []  # (mass, ranking mass, index)

    def __call__(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        from infmllm_ros.kernels import window_scores

        n = key.shape[-2]
        mass = window_scores(query[:, :, -self.n_queries:], key, scaling, normalize=False)[0]  # [H_kv, n]
        rank = None
        if 2 * layer_idx >= len(self.cache.layers):  # later half: the ranking signal
            rank = window_scores(query[:, :, -min(EVIDENCE_QUERIES, self.n_queries):], key, scaling,
                                 normalize=False)[0].float().cpu()
        index = self.cache.layers[layer_idx].index[:, :n]
        self.parts.append((mass.float().cpu(), rank, index.cpu().clone()))

    def evidence(self, cmap: ChunkMap, question: Span) -> dict | None:
        """Top frames by the mass of the question's last queries in the later layers, mildly recency-corrected
        (weights sum to 1 over frames), top frames by mass per stored token, and the shares of the question's total
        mass on frames, on earlier text turns and on the question chunk itself."""
        if not self.parts or not cmap.spans:
            return None
        per_span = torch.zeros(len(cmap.spans), dtype=torch.float64)
        ranked = torch.zeros(len(cmap.spans), dtype=torch.float64)
        held = torch.zeros(len(cmap.spans), dtype=torch.float64)  # stored (layer, head, token) slots per span
        for mass, rank, index in self.parts:
            ids = cmap.span_ids(index).flatten()
            per_span.scatter_add_(0, ids, mass.double().flatten())
            if rank is not None:
                ranked.scatter_add_(0, ids, rank.double().flatten())
            held.scatter_add_(0, ids, torch.ones(ids.shape, dtype=torch.float64))
        total = float(per_span.sum()) or 1.0
        kept = [i for i, s in enumerate(cmap.spans) if s.kind == "frame" and held[i] > 0]  # oldest first
        on_frames = sum(float(per_span[i]) for i in kept)
        on_self = sum(float(m) for m, s in zip(per_span.tolist(), cmap.spans, strict=True) if s is question)
        score = [(float(ranked[i]) * (len(kept) - k) ** RECENCY, cmap.spans[i]) for k, i in enumerate(kept)]
        on_score = sum(v for v, _ in score)
        top = sorted(score, key=lambda vs: -vs[0])[:TOP_FRAMES]
        # mass per stored token: a frame the cache kept only a few (high-scoring) tokens of is not outweighed by the
        # fully held newest frames just for its token count
        dense = [(float(per_span[i]) / float(held[i]), cmap.spans[i]) for i in kept]
        on_dense = sum(d for d, _ in dense)
        top_dense = sorted(dense, key=lambda ds: -ds[0])[:TOP_FRAMES]
        return {"frames": [{"stamp": s.stamp, "weight": round(v / on_score, 4)} for v, s in top if on_score > 0],
                "frames_per_token": [{"stamp": s.stamp, "weight": round(d / on_dense, 4)} for d, s in top_dense
                                     if on_dense > 0],
                "frame_share": round(on_frames / total, 4),
                "text_share": round((total - on_frames - on_self) / total, 4),
                "question_share": round(on_self / total, 4)}


@contextmanager
def probing(cache, n_queries: int):
    """Hand the attention function an EvidenceProbe for the forwards inside the block (one question prefill)."""
    probe = EvidenceProbe(cache, n_queries)
    cache.attention_probe = probe
    try:
        yield probe
    finally:
        cache.attention_probe = None

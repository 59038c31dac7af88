"""One layer of the bounded cache: static K/V buffers allocated once, plus per-slot metadata.

Slots 0..stored-1 hold the kept tokens in temporal order (per KV head: heads may keep different tokens, always the
same count). `seen` counts every token ever fed. transformers reads `get_seq_length()` (= seen) for its query
offset and `get_mask_sizes(q)` = (stored + q, seen - stored), which places every stored token before the queries.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ..kernels import compact_rerotate_
from .policies import Candidates


class BoundedLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = False  # evicted tokens cannot come back
    is_sliding = False

    def __init__(self, owner, heads: int, head_dim: int, capacity: int, rows: int, device, dtype):
        super().__init__()
        self.owner = owner  # the BoundedCache: positions and chunk number of the current forward
        self.capacity = capacity
        self.keys = torch.zeros(1, heads, capacity, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros(1, heads, capacity, head_dim, device=device, dtype=dtype)
        self.pos = torch.zeros(heads, capacity, rows, device=device, dtype=torch.long)  # position rows per slot
        self.index = torch.zeros(heads, capacity, device=device, dtype=torch.long)  # stream index per slot
        self.chunk = torch.zeros(heads, capacity, device=device, dtype=torch.long)
        self.window = torch.zeros(heads, capacity, device=device, dtype=torch.float32)
        self.accumulated = torch.zeros(heads, capacity, device=device, dtype=torch.float32)
        self.device, self.dtype = device, dtype
        self.is_initialized = True
        self.stored = self.seen = self.scored = 0
        self.forward_id = -1

    def lazy_initialization(self, key_states, value_states) -> None:
        pass  # allocated up front: memory is known at start-up

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the forward's K/V (already rotated) and return every stored + new slot (what the mask announced)."""
        q, s = key_states.shape[-2], self.stored
        pos = self.owner.pending_positions(self, q)  # [rows, q]
        if key_states.shape[0] != 1:
            raise ValueError("BoundedCache holds one stream (batch size 1)")
        if s + q > self.capacity:
            raise RuntimeError(
                f"BoundedCache: {s} stored + {q} new tokens exceed the capacity {self.capacity} "
                f"(budget + max_chunk + max_new_tokens); call end_chunk() after every prefill chunk, "
                f"or raise max_chunk / max_new_tokens (policy {self.owner.config.policy!r})"
            )
        self.keys[:, :, s : s + q] = key_states
        self.values[:, :, s : s + q] = value_states
        self.pos[:, s : s + q] = pos.T.to(self.pos.device)
        self.index[:, s : s + q] = self.seen + torch.arange(q, device=self.index.device)
        self.chunk[:, s : s + q] = self.owner.chunks
        self.window[:, s : s + q] = 0
        self.accumulated[:, s : s + q] = 0
        self.stored, self.seen = s + q, self.seen + q
        return self.keys[:, :, : s + q], self.values[:, :, : s + q]

    def record_scores(self, scores: torch.Tensor, mode: str) -> None:
        """Scores [H, n] of this forward's attention (n = stored); "window" replaces, "every_step" accumulates."""
        n = scores.shape[-1]
        if mode == "window":
            self.window[:, :n] = scores
        else:
            self.accumulated[:, :n] += scores
        self.scored = n

    def candidates(self, chunk_now: int) -> Candidates:
        n = self.stored
        return Candidates(self.window[:, :n], self.accumulated[:, :n], self.index[:, :n], self.chunk[:, :n], chunk_now)

    def compact(self, keep: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor | None) -> None:
        """Move kept slots [H, m] to the front; turn their keys by delta [H, m] (inv_freq None: no turn)."""
        m = keep.shape[1]
        compact_rerotate_(self.keys[0], self.values[0], keep, delta, inv_freq)
        self.pos[:, :m] = self.pos.gather(1, keep[..., None].expand(-1, -1, self.pos.shape[-1])) + delta[..., None]
        for meta in (self.index, self.chunk, self.window, self.accumulated):
            meta[:, :m] = meta.gather(1, keep)
        self.stored = self.scored = m

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, self.seen - self.stored

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.stored = self.seen = self.scored = 0
        self.forward_id = -1

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("BoundedCache holds one stream; beam search is not supported")

    def crop(self, max_length: int):
        raise NotImplementedError("BoundedCache cannot crop: evicted tokens are gone")

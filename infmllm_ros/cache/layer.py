"""One layer of the bounded cache: views into the cache's stacked static buffers (allocated once).

Slots 0..stored-1 hold the kept tokens in temporal order (per KV head: heads may keep different tokens, always the
same count). `seen` counts every token ever fed. transformers reads `get_seq_length()` (= seen) for its query
offset and `get_mask_sizes(q)` = (stored + q, seen - stored), which places every stored token before the queries.

Keys stay as the model rotated them (at the token's original position); `offset` [H, cap, rows] = current - original
position per position row (M-RoPE rows may move apart; each rotary section turns by its own row).
Attention reads the keys turned by offset, one rotation from the model's own key. With the cache's read copy (CPU
default) they sit in `read_keys`: offsets change only at an eviction, so each layer rebuilds its copy once after one
(`stale`), at its next read; new tokens have offset 0 and are copied as they come. Without it (CUDA default),
`update` turns every stored key at every forward (rotate-on-read, one fused kernel).
"""

from __future__ import annotations

from transformers.cache_utils import CacheLayerMixin

from ..kernels import rotate_keys


class BoundedLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = False  # evicted tokens cannot come back
    is_sliding = False

    def __init__(self, owner, idx: int):
        super().__init__()
        self.owner = owner  # the BoundedCache: stacked buffers, positions and chunk number of the current forward
        self.idx = idx
        self.capacity = owner.config.capacity
        self.keys = owner.keys[idx : idx + 1]  # [1, H, cap, D]
        self.read_keys = owner.read_keys[idx : idx + 1]  # a view of keys when the cache keeps no read copy
        self.copies = owner.read_copy
        self.values = owner.values[idx : idx + 1]
        for name in ("pos", "offset", "index", "chunk", "window", "accumulated"):
            setattr(self, name, getattr(owner, name)[idx])  # [H, cap] ([H, cap, rows] for pos and offset)
        self.device, self.dtype = owner.keys.device, owner.keys.dtype
        self.is_initialized = True
        self.stored = self.seen = self.scored = 0
        self.forward_id = -1
        self.stale = False  # read_keys[:stored] no longer match keys + offset (after an eviction)

    def lazy_initialization(self, key_states, value_states) -> None:
        pass  # allocated up front: memory is known at start-up

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the forward's K/V (rotated by the model) and return every stored + new slot (what the mask
        announced), keys turned to their current positions."""
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
        n = s + q
        if self.stale:
            self._refresh_read_keys(s)
        self.keys[:, :, s:n] = key_states
        if self.copies:
            self.read_keys[:, :, s:n] = key_states  # offset 0: read as the model rotated it
        self.values[:, :, s:n] = value_states
        self.owner.write_new_slots(s, q, self.seen, pos)  # every layer's metadata, once per forward
        self.stored, self.seen = n, self.seen + q
        if not self.copies and self.owner.turned:  # some stored key sits away from where the model rotated it
            return self._turned(n)[None], self.values[:, :, :n]  # rotate-on-read
        return self.read_keys[:, :, :n], self.values[:, :, :n]

    def _turned(self, n: int):
        o = self.owner
        return rotate_keys(self.keys[0, :, :n], self.offset[:, :n], o.inv_freq, o.freq_rows)

    def _refresh_read_keys(self, n: int) -> None:
        self.read_keys[0, :, :n] = self._turned(n)
        self.stale = False

    def current_keys(self):
        """[H, stored, D] the keys as attention reads them (rotated at their current positions)."""
        if not self.copies:
            return self._turned(self.stored) if self.owner.turned else self.keys[0, :, : self.stored]
        if self.stale:
            self._refresh_read_keys(self.stored)
        return self.read_keys[0, :, : self.stored]

    def record_scores(self, scores, mode: str) -> None:
        """Scores [H, n] of this forward's attention (n = stored); "window" replaces, "every_step" accumulates."""
        n = scores.shape[-1]
        if mode == "window":
            self.window[:, :n] = scores
        else:
            self.accumulated[:, :n] += scores
        self.scored = n

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, self.seen - self.stored

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.stored = self.seen = self.scored = 0
        self.forward_id = -1
        self.stale = False

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("BoundedCache holds one stream; beam search is not supported")

    def crop(self, max_length: int):
        raise NotImplementedError("BoundedCache cannot crop: evicted tokens are gone")

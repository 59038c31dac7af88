"""BoundedCache: a transformers `Cache` whose layers keep at most `budget` tokens after each chunk.

The session drives it explicitly (batch 1):

    cache.begin_forward(position_ids, prefill=True)     # announce this forward's positions
    model(..., position_ids=position_ids, cache=cache, use_cache=True, **cache.forward_kwargs())
    cache.end_chunk()                                   # after a prefill chunk: scores -> eviction -> re-index

The attention function (infmllm_ros.attention) finds the cache through the extra forward kwarg and hands it the
retrieval-window scores of each layer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..kernels import compact_, window_scores
from .config import CacheConfig
from .layer import BoundedLayer
from .policies import Candidates, make_policy
from .rope import freq_rows_of, head_dim_of, inv_freq_from_config, mrope_section_of, text_config_of

FORWARD_KWARG = "bounded_cache"


def _shape(text_config) -> tuple[int, int, int]:
    layers = text_config.num_hidden_layers
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    return layers, heads, head_dim_of(text_config)


class BoundedCache(Cache):
    def __init__(self, config: CacheConfig, model_config, device="cpu", dtype=torch.float32, read_copy=None):
        """read_copy: keep the keys attention reads (turned to their current positions) in a buffer of their own,
        rebuilt once per layer after each eviction, instead of turning every stored key at every forward. Costs
        one more K buffer (layers x kv_heads x capacity x head_dim x itemsize). None: on CPU, where turning costs
        milliseconds per layer per step; not on CUDA, where the fused Triton turn costs little and memory is scarce.
        Only an evicting policy in reindex mode ever turns a key; otherwise there is nothing to copy."""
        text = text_config_of(model_config)
        kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ValueError(f"BoundedCache supports full-attention layers only, the model has {sorted(kinds)}")
        self.config = config
        self.policy = make_policy(config)
        self.sections = mrope_section_of(text)  # None: 1-D RoPE; else Qwen2-VL M-RoPE (3 position rows)
        self.rows = 3 if self.sections else 1
        self.inv_freq = inv_freq_from_config(text, device)
        if self.sections and sum(self.sections) != self.inv_freq.numel():
            raise ValueError(f"M-RoPE sections {self.sections} must sum to the {self.inv_freq.numel()} rotary "
                             "frequencies")  # fmt: skip
        self.freq_rows = freq_rows_of(self.sections, device)  # [F] position row of each frequency; None: 1-D
        device = torch.device(device)
        n_layers, heads, head_dim = _shape(text)
        if read_copy is None:
            read_copy = device.type != "cuda"
        self.read_copy = bool(read_copy) and _turns_keys(config)
        need = self.kv_bytes_for(config, model_config, dtype, self.read_copy)
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            if need > free:
                raise MemoryError(f"BoundedCache needs {need / 2**20:.1f} MiB of K/V buffers, {free / 2**20:.1f} free")
        # every layer's buffers and metadata stacked [layers, H, cap, ...]: one selection and one compaction per chunk
        cap, shape = config.capacity, (n_layers, heads, config.capacity)
        try:
            self.keys = torch.zeros(*shape, head_dim, device=device, dtype=dtype)
            self.values = torch.zeros(*shape, head_dim, device=device, dtype=dtype)
            # what attention reads: the keys turned to their current positions, refreshed once per layer after
            # each eviction (offsets change only there), not at every forward. Absolute mode never turns a key.
            self.read_keys = torch.zeros_like(self.keys) if self.read_copy else self.keys
        except (RuntimeError, MemoryError) as e:
            raise MemoryError(f"BoundedCache: cannot allocate {need / 2**20:.1f} MiB of K/V buffers: {e}") from e
        self.pos = torch.zeros(*shape, self.rows, device=device, dtype=torch.long)  # current position rows per slot
        # current - position the key was rotated at, per position row (M-RoPE rows can move by different amounts)
        self.offset = torch.zeros(*shape, self.rows, device=device, dtype=torch.long)
        self.index = torch.zeros(shape, device=device, dtype=torch.long)  # stream index per slot
        self.chunk = torch.zeros(shape, device=device, dtype=torch.long)
        self.window = torch.zeros(shape, device=device, dtype=torch.float32)
        self.accumulated = torch.zeros(shape, device=device, dtype=torch.float32)
        self.arange = torch.arange(cap, device=device)
        super().__init__(layers=[BoundedLayer(self, i) for i in range(n_layers)])
        self.reset()

    # ---- sizes -------------------------------------------------------------------------------------------------
    @staticmethod
    def kv_bytes_for(config: CacheConfig, model_config, dtype=torch.float32, read_copy: bool = False) -> int:
        """Bytes of the K and V buffers (+ the read copy of K when the cache keeps one, see __init__): (2 or 3) x
        layers x kv_heads x capacity x head_dim x itemsize."""
        n_layers, heads, head_dim = _shape(text_config_of(model_config))
        one = n_layers * heads * config.capacity * head_dim * torch.empty((), dtype=dtype).element_size()
        return (3 if read_copy and _turns_keys(config) else 2) * one

    @property
    def stored(self) -> int:
        return self.layers[0].stored

    @property
    def seen(self) -> int:
        return self.layers[0].seen

    @property
    def kv_bytes(self) -> int:
        bufs = (self.keys, self.values) + ((self.read_keys,) if self.read_keys is not self.keys else ())
        return sum(t.numel() * t.element_size() for t in bufs)

    def stats(self) -> dict:
        return {
            "seen": self.seen, "stored": self.stored, "budget": self.config.budget, "capacity": self.config.capacity,
            "kv_bytes": self.kv_bytes, "evictions": self.evictions, "next_position": self.next_position,
            "policy": self.config.policy,
        }  # fmt: skip

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.next_position = 0  # where the session's next chunk starts
        self.chunks = 0  # prefill chunks fed so far
        self.evictions = 0
        self.row_squeezes = 0  # evictions whose M-RoPE positions were squeezed row by row (the bound's fallback)
        self.decoded = 0  # tokens decoded since the last prefill
        self.turned = False  # some stored key's offset may be non-zero (set by a re-indexing eviction)
        self.forward_id = -1
        self._slots_written = False  # this forward's new slots have their metadata (write_new_slots)
        self.prefill = False
        self._pending = None

    # ---- one forward ---------------------------------------------------------------------------------------------
    def forward_kwargs(self) -> dict:
        """Extra kwargs for `model(...)`: they reach the registered attention function of every text layer."""
        return {FORWARD_KWARG: self}

    def _rows(self, position_ids) -> torch.Tensor:
        """position_ids in any accepted shape -> [rows, q] long."""
        pos = torch.as_tensor(position_ids).long()
        if pos.dim() == 3:
            pos = pos[:, 0]  # (rows, B=1, q) -> (rows, q)
        pos = pos.reshape(-1, pos.shape[-1])
        if pos.shape[0] == 4:
            pos = pos[1:]  # Qwen2-VL's (text row + 3 M-RoPE rows)
        if pos.shape[0] == 1 and self.rows == 3:
            pos = pos.expand(3, -1)  # a text/decode token: same position in t, h, w
        if pos.shape[0] != self.rows:
            raise ValueError(f"position_ids with {pos.shape[0]} rows for a model with {self.rows} position row(s)")
        return pos

    def check_positions(self, position_ids) -> None:
        """The text model's forward must use exactly the positions begin_forward announced (else RoPE and the
        cache's re-indexing disagree: silently wrong output). Called by the hook attention.install adds."""
        if position_ids is None:
            raise ValueError("BoundedCache: pass position_ids to the forward (the ones given to cache.begin_forward)")
        if self._pending is None or not torch.equal(self._rows(position_ids).to(self._pending.device), self._pending):
            raise ValueError("BoundedCache: the forward's position_ids differ from cache.begin_forward's")

    def begin_forward(self, position_ids: torch.Tensor, prefill: bool = True) -> None:
        """Announce the next forward's positions: (q,), (1, q), (3, 1, q) / (3, q) for M-RoPE, or (4, 1, q)."""
        pos = self._rows(position_ids)
        q = pos.shape[1]
        if prefill and q > self.config.max_chunk:
            raise ValueError(f"prefill chunk of {q} tokens > max_chunk {self.config.max_chunk}")
        decoded = 0 if prefill else self.decoded + q
        if decoded > self.config.max_new_tokens:
            raise ValueError(f"{decoded} tokens decoded since the last chunk > max_new_tokens "
                             f"{self.config.max_new_tokens}")  # fmt: skip
        self.decoded = decoded
        self.chunks += int(prefill)
        self.prefill = prefill
        self.forward_id += 1
        self._slots_written = False
        self._pending = pos
        self.next_position = max(self.next_position, int(pos.max()) + 1)

    def pending_positions(self, layer: BoundedLayer, q: int) -> torch.Tensor:
        if self._pending is None or layer.forward_id == self.forward_id or self._pending.shape[1] != q:
            raise RuntimeError(
                "BoundedCache: call cache.begin_forward(position_ids, prefill=...) before every forward, with the "
                f"forward's positions ({q} tokens); model.generate cannot drive it: use "
                "infmllm_ros.engine.StreamingSession"
            )
        layer.forward_id = self.forward_id
        return self._pending

    def write_new_slots(self, s: int, q: int, seen: int, pos: torch.Tensor) -> None:
        """Metadata of this forward's q new slots [s, s + q), for every layer at once (all layers hold the same count
        and see the same tokens): the first layer's update writes it, the others find it done. Six writes per
        forward instead of six per layer: on a GPU a decode step is launch-bound."""
        if self._slots_written:
            return
        n = s + q
        self.pos[:, :, s:n] = pos.T.to(self.pos.device)
        self.offset[:, :, s:n] = 0
        self.index[:, :, s:n] = seen + self.arange[:q]
        self.chunk[:, :, s:n] = self.chunks
        self.window[:, :, s:n] = 0
        self.accumulated[:, :, s:n] = 0
        self._slots_written = True

    def after_attention(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Called by the attention function: hand this layer the scores its policy needs."""
        mode = self.policy.scores
        if mode == "window" and self.prefill:
            w = min(self.config.window or query.shape[-2], query.shape[-2])  # 0: the whole chunk votes
            scores = window_scores(query[:, :, -w:], key, scaling, normalize=True)
        elif mode == "every_step":
            scores = window_scores(query, key, scaling, normalize=False)
        else:
            return
        self.layers[layer_idx].record_scores(scores[0], mode)

    # ---- eviction ------------------------------------------------------------------------------------------------
    def end_chunk(self) -> None:
        """After a prefill chunk's forward: evict to the budget (same count in every layer), then re-index.
        One selection over the stacked [layers, H, stored] metadata, one compaction of every layer, one host sync."""
        n = self.stored
        if self.policy.scores != "none" and any(la.scored != n for la in self.layers):
            raise RuntimeError(
                f"policy {self.config.policy!r} has no attention scores for this chunk: install the attention "
                "(infmllm_ros.attention.install(model)) and pass **cache.forward_kwargs() to the forward"
            )
        c = Candidates(self.window[..., :n], self.accumulated[..., :n], self.index[..., :n], self.chunk[..., :n],
                       self.chunks)  # fmt: skip
        keep = self.policy.keep(c)  # [layers, H, m] or None
        if keep is None:
            return
        n_layers, heads, m = keep.shape
        rows = n_layers * heads
        keep = keep.reshape(rows, m)
        if self.config.positions == "reindex":
            delta, self.next_position = self._reindex(keep)  # [R, m, rows]
            self.turned = True
        else:
            delta = torch.zeros_like(keep)[..., None]
        compact_(self.keys.view(rows, self.config.capacity, -1), self.values.view(rows, self.config.capacity, -1),
                 keep)  # fmt: skip
        kept_rows = keep[..., None].expand(-1, -1, self.rows)
        for meta in (self.pos, self.offset):
            flat = meta.view(rows, self.config.capacity, self.rows)
            flat[:, :m] = flat.gather(1, kept_rows) + delta
        for meta in (self.index, self.chunk, self.window, self.accumulated):
            flat = meta.view(rows, -1)
            flat[:, :m] = flat.gather(1, keep)
        for layer in self.layers:
            layer.stored = layer.scored = m
            layer.stale = self.read_copy  # its read copy is rebuilt at its next read
        self.evictions += 1

    def _reindex(self, keep: torch.Tensor):
        """Squeeze out every position no kept token covers, then right-align every (layer, head) on the newest kept
        token. keep [R, m] over R = layers x heads rows. Returns (delta [R, m, rows] for the kept tokens, the new
        next_position as an int).

        Span squeeze (always tried): each token spans [min row, max row] of its positions and moves as a whole (an
        image keeps its t/h/w layout); a position is freed when no kept token of that (layer, head) covers it. For
        1-D RoPE that leaves <= m positions. An M-RoPE image token spans up to max(h, w) positions, so m kept tokens
        can cover more than the budget: then the (layer, head)s whose squeeze ends past the budget squeeze each
        position row alone (a token uses one position per row, so each row keeps <= m <= budget positions), which
        proves next_position <= budget after every eviction. Host syncs: one, two when that fallback runs."""
        rows, n, end = keep.shape[0], self.stored, self.next_position
        pos = self.pos.view(rows, self.config.capacity, self.rows)[:, :n]
        kept = pos.gather(1, keep[..., None].expand(-1, -1, self.rows))  # [R, m, rows]
        delta, ends = _squeeze(kept.min(-1).values, kept.max(-1).values, end)  # [R, m], [R]
        top = int(ends.max())  # the host sync of an eviction
        if top <= self.config.budget:
            return (delta + (top - ends)[:, None])[..., None], top
        per_row = kept.permute(0, 2, 1).reshape(rows * self.rows, -1)  # [R x rows, m]: every row alone
        row_delta, row_ends = _squeeze(per_row, per_row, end)
        row_delta, row_ends = row_delta.view(rows, self.rows, -1).permute(0, 2, 1), row_ends.view(rows, self.rows)
        wide = ends > self.config.budget  # [R]: the (layer, head)s whose span squeeze ends past the budget
        top = int(torch.where(wide, row_ends.max(-1).values, ends).max())  # <= m <= budget: the second sync
        row_delta = row_delta + (top - row_ends)[:, None, :]  # each row right-aligned: the newest token at top - 1
        span_delta = (delta + (top - ends)[:, None])[..., None]
        self.row_squeezes += 1
        return torch.where(wide[:, None, None], row_delta, span_delta), top

    def invalidate_read_keys(self) -> None:
        """Whoever writes keys or offsets other than through update/end_chunk (a restored snapshot) calls this: every
        layer then rebuilds its read copy from keys + offset at its next read."""
        self.turned = True
        for layer in self.layers:
            layer.stale = self.read_copy

    def kept_positions(self, row: int = 0) -> torch.Tensor:
        """[layers, H, stored] positions (one row) of the stored tokens; in absolute mode, their stream positions."""
        return torch.stack([layer.pos[:, : layer.stored, row] for layer in self.layers])

    def kept_indices(self) -> torch.Tensor:
        """[layers, H, stored] stream indices (0 = first token fed) of the stored tokens."""
        return torch.stack([layer.index[:, : layer.stored] for layer in self.layers])


def _turns_keys(config: CacheConfig) -> bool:
    """Does this cache ever turn a key? Only when it evicts and re-indexes."""
    return config.positions == "reindex" and config.policy != "full"


def _squeeze(lo: torch.Tensor, hi: torch.Tensor, end: int):
    """Kept spans [lo, hi] ([R, m] positions < end) -> (delta [R, m]: minus the positions no span covers below each
    lo, ends [R]: positions still covered). Removing uncovered positions keeps every span whole and every order."""
    marks = torch.zeros(lo.shape[0], end + 1, dtype=torch.long, device=lo.device)
    marks.scatter_add_(1, lo, torch.ones_like(lo))
    marks.scatter_add_(1, hi + 1, -torch.ones_like(hi))
    used = marks.cumsum(-1)[:, :end] > 0  # [R, end] positions covered by a kept token
    shift = torch.cumsum(~used, -1) - (~used).long()  # freed positions before p
    return -shift.gather(1, lo), used.sum(-1)

"""Recall: archive every frame's K/V at prefill, bring the best-matching archived frames back for a question.

Why archive at prefill, not at eviction: right after a frame chunk's forward, before `end_chunk` evicts, the frame's
K/V sit complete in the newest slots of every layer and KV head, rotated at their original positions (offset 0):
one contiguous copy per frame. At eviction time, heads keep different tokens, so a frame leaves the cache piece by
piece over many chunks, with keys that may already have been re-indexed; archiving there would need per-head
bookkeeping and could not store a frame whole.

Question time (`FrameRecall.before_question`, from `StreamingSession.ask`):
1. Probe: the question chunk runs one forward whose per-layer queries are captured (the attention probe hook), then
   the cache is rolled back (stored / seen / scored / next_position / chunk count / scores restored; the slots the
   probe wrote beyond `stored` are overwritten later). Cost: one question prefill over the held cache; no cheaper
   source of the question's queries exists before the question is in the cache.
2. Rank (`choose`): among the frames whose tokens the cache does not still hold (a frame with at least
   HELD_FRACTION of its (layer, head, token) slots held is in view already), the most words shared by the question
   and the frame's caption first, then the newest (past questions ask where / how the object was LAST seen). A
   frame's caption is the model's own greedy answer to CAPTION_PROMPT with the frame inserted right before it (read
   as the current view), made the first time the frame is a candidate and kept (`caption`): one prompt prefill +
   CAPTION_STEPS - 1 decode steps per archived frame over the held cache, rolled back (probe_forward). Captions
   travel with a snapshot (engine/snapshot_archive.py: made again over another cache they could differ).
   Rules that failed (evidence frame ranked first, past questions beyond the window; all measured with the embedded
   checkpoint before its grounding loss, 2026-12-03): FrameArchive.score (query .
   representative key) 2/66 (seeds 0-7) and 6/70 (16-23); the answer's confidence (first-token or sequence log-prob,
   entropy) with each frame inserted 0-5/70; single (layer, head) query-key scores at most 12/70 (AUC for "frame
   shows the object" <= 0.72); the caption rule 23/70 (16-23). For "what appeared after X?" questions no recalled
   frame helps this model (seeds 16-23: 7/29 right with the caption rule, 6-7/29 with the oldest match, or the oldest
   match and the next frame naming something else; 5/29 recalling the frame where the answer object appeared).
3. Insert, oldest first, into the slots right after the held tokens. Keys stay as archived (rotated at their
   original position p0); the slot's offset = new - p0 (rotate-on-read; one shift for every M-RoPE row, so the
   frame's t/h/w layout is kept). Positions (`placement`): "past" (default): just before the oldest held token, so
   the recalled frames read as older than everything in view; "question": just after the held tokens, right before
   the question (the issue's first design). Why "past" is the default: with "question", the tiny robot VLM took the
   recalled frame for the current view: current questions fell from 94 % to 62 % (1 frame) and 30 % (2 frames) on
   held-out seeds 16-23, while "past" left them at 95 % (docs/BENCHMARKS.md has both on seeds 0-7). Stream indices:
   the recalled tokens take the next `n` stream indices (seen grows by n, so the causal mask's offsets stay valid)
   and the chunk map gets a frame span with the archived stamp, so the memory view / evidence see them as frames.
4. The question is prefilled WITHOUT eviction, the answer decoded over held + recalled + question.
5. `release`: the recalled slots are compacted out (everything after them moves down) and the deferred eviction
   runs (`end_chunk`, with the question's window scores, the answer's tokens counted as scored 0): the recalled
   slots are never eviction candidates, and the held tokens are evicted back to the budget as usual.

Bounds: GPU slots: the cache's capacity includes `recall_slots` = recall_frames x (max frame chunk tokens + 8), so
stored <= budget + recall_slots + question chunk + answer <= capacity. Positions: "question" placement moves
next_position by at most the recalled frames' position spans (<= recall_slots) during an answer, and the deferred
eviction's re-index (positions "reindex") squeezes that gap out again, so the bound between questions is the one
without recall; "past" placement uses positions below the held ones (down to -recall_slots, which RoPE handles
like any other offset) and leaves next_position alone. With positions "absolute" (the test oracle) a "question"
recall's spans stay consumed, like every other token.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from infmllm_ros.memory.archive import FrameArchive

PLACEMENTS = ("question", "past")
REP_TOKENS = 4  # representative keys per frame, layer and KV head in the index (archive.py: why)
CAPTION_PROMPT = "what is in front of you?"  # the robot VLM's own description of its current view (world.py)
CAPTION_STEPS = 4  # greedy tokens of a caption ("a red cube" + end)
STOP_WORDS = frozenset({"a", "an", "the"})
HELD_FRACTION = 0.5  # a frame the cache still holds at least half of is not recalled (it is in view already)
DEFAULT_ARCHIVE_MB = 256.0
# the cache's stacked per-slot tensors, [layers, H, cap, ...]: what a slot move must carry
SLOT_TENSORS = ("keys", "values", "pos", "offset", "index", "chunk", "window", "accumulated")


def default_archive_dir() -> str:
    """A fresh folder under the temp dir: two sessions never share (and clear) one archive."""
    return tempfile.mkdtemp(prefix="infmllm_archive_")


class FrameRecall:
    """The session's long-term memory: a FrameArchive filled at prefill, recalled into reserved cache slots."""

    def __init__(self, cache, recall_frames: int, recall_slots: int, archive_mb: float = DEFAULT_ARCHIVE_MB,
                 archive_dir: str | None = None, placement: str = "past", caption_prompt: str = CAPTION_PROMPT):
        if recall_frames < 1:
            raise ValueError(f"recall_frames must be >= 1 to recall, got {recall_frames}")
        if not archive_mb > 0:
            raise ValueError(f"memory.archive_mb must be > 0, got {archive_mb}")
        if placement not in PLACEMENTS:
            raise ValueError(f"recall placement must be one of {PLACEMENTS}, got {placement!r}")
        self.placement, self.caption_prompt = placement, caption_prompt
        self.recall_frames, self.recall_slots = int(recall_frames), int(recall_slots)
        self.max_bytes = int(archive_mb * 2**20)
        self.dir = os.path.expanduser(archive_dir) if archive_dir else default_archive_dir()
        n_layers, heads, _cap, head_dim = cache.keys.shape
        self.shape = dict(layers=n_layers, heads=heads, head_dim=head_dim, rows=cache.rows, rep_tokens=REP_TOKENS,
                          inv_freq=cache.inv_freq)
        self.archive: FrameArchive | None = None
        self.reset()

    def reset(self) -> None:
        """A new stream: a fresh archive (its folder cleared), nothing recalled."""
        self.archive = FrameArchive(self.dir, self.max_bytes, **self.shape)
        self.ranges: dict[int, tuple[int, int]] = {}  # frame_id -> stream index range [start, end)
        self.captions: dict[int, frozenset[str]] = {}  # frame_id -> the caption's words (made at its first ranking)
        self._question = None  # (session, chunk, question_tokens) while before_question ranks
        self.active: tuple[int, int] | None = None  # (first recalled slot, count) while a question holds them
        self.last = dict(frames=0, tokens=0, bytes_read=0, seconds=0.0, stamps=[])
        self.recalls = 0

    # ---- prefill -------------------------------------------------------------------------------------------------
    def archive_frame(self, cache, n: int, stamp: float) -> bool:
        """After a frame chunk's forward, before its eviction: its n tokens are the newest n slots of every head."""
        stored, seen = cache.stored, cache.seen
        s = stored - n
        frame_id = seen - n  # the frame's first stream index: unique and increasing
        keys = cache.keys[:, :, s:stored]
        values = cache.values[:, :, s:stored]
        positions = cache.pos[0, 0, s:stored]  # [n, rows]: every head got the chunk's positions
        ok = self.archive.add(frame_id, float(stamp), keys, values, positions)
        if ok:
            self.ranges[frame_id] = (frame_id, seen)
        for gone in [f for f in self.ranges if f not in self.archive.frames]:
            del self.ranges[gone]  # thinned out (or damaged)
            self.captions.pop(gone, None)
        return ok

    # ---- question ------------------------------------------------------------------------------------------------
    def held_fraction(self, cache, frame_ids: list[int]) -> torch.Tensor:
        """Share of each frame's (layer, head, token) slots the cache still holds, from the stored stream indices."""
        if not frame_ids:
            return torch.zeros(0)
        starts = torch.tensor([self.ranges[f][0] for f in frame_ids])
        ends = torch.tensor([self.ranges[f][1] for f in frame_ids])
        order = torch.argsort(starts)
        starts_sorted, ends_sorted = starts[order], ends[order]
        idx = cache.kept_indices().flatten().cpu()
        j = torch.bucketize(idx, starts_sorted, right=True) - 1
        inside = (j >= 0) & (idx < ends_sorted[j.clamp(min=0)])
        counts = torch.bincount(j[inside], minlength=len(frame_ids)).float()
        n_layers, heads = self.shape["layers"], self.shape["heads"]
        frac_sorted = counts / ((ends_sorted - starts_sorted).float() * n_layers * heads)
        frac = torch.empty_like(frac_sorted)
        frac[order] = frac_sorted
        return frac

    def choose(self, cache, queries: torch.Tensor, query_positions: torch.Tensor) -> list[int]:
        """Frame ids to recall among the frames not held, as many as fit recall_frames / slots: most words shared by
        the question and the frame's caption first, then the most recent (see `caption`); without the question's
        chunk (a direct call) by FrameArchive.score."""
        ids, scores = self.archive.score(queries, query_positions=query_positions)
        if not ids:
            return []
        held = self.held_fraction(cache, ids)
        free = [i for i in range(len(ids)) if held[i] < HELD_FRACTION]
        if self._question is not None:
            session, chunk, question_tokens = self._question
            words = _words(session.tokenizer.decode(chunk.ids[0, -question_tokens:].tolist(),
                                                    skip_special_tokens=True))
            overlap = {i: len(words & self.caption(session, chunk, question_tokens, ids[i])) for i in free}
            order = sorted(free, key=lambda i: (overlap[i], ids[i]), reverse=True)
        else:
            order = [i for i in torch.argsort(scores, descending=True, stable=True).tolist() if i in set(free)]
        picked, slots = [], 0
        for i in order:
            if len(picked) == self.recall_frames:
                break
            n = self.archive.frames[ids[i]].n
            if slots + n > self.recall_slots:
                continue
            picked.append(ids[i])
            slots += n
        return picked

    def caption(self, session, chunk, question_tokens: int, frame_id: int) -> frozenset[str]:
        """The words of the model's answer to `caption_prompt` with the archived frame inserted right before the
        prompt (where the model reads it as its current view), over the held cache; one probe of CAPTION_STEPS
        greedy tokens, rolled back, made once per frame and kept. Why: matching the question's queries against the
        frames' keys found the frame a past question asks about in 2 of 66 questions (seeds 0-7), the model's
        confidence in its answer with each frame inserted in 5 of 70 (seeds 16-23); the model's own caption names
        the frame's objects well enough for word overlap with the question (13 of 35, seeds 16-19: docs/bench/
        recall_archive.md)."""
        if frame_id in self.captions:
            return self.captions[frame_id]
        kv = self.archive.get(frame_id)
        if kv is None:
            return frozenset()
        adapter = session.adapter
        open_, close_ = adapter.question_wrap()
        prompt = adapter.encode(open_) + adapter.encode_user(self.caption_prompt) + adapter.encode(close_)
        pending = chunk.ids[:, :chunk.ids.shape[1] - question_tokens]  # the previous turn's closing tokens
        ids = torch.cat([pending, torch.tensor([prompt], dtype=torch.long)], 1)
        probe = type(chunk)(ids=ids, mm_token_type_ids=torch.zeros_like(ids))
        _q, _p, logits = probe_forward(session, probe, len(prompt), frames=[kv], before_held=False, capture=False,
                                       steps=CAPTION_STEPS)
        tokens = logits.argmax(-1).tolist()
        eos = getattr(session, "eos_ids", set())
        cut = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))
        self.captions[frame_id] = _words(session.tokenizer.decode(tokens[:cut], skip_special_tokens=True))
        return self.captions[frame_id]

    def before_question(self, session, chunk, question_tokens: int) -> int:
        """Probe the question, pick frames, insert them. Returns the number of recalled tokens (0: none)."""
        t0 = time.perf_counter()
        cache = session.cache
        self.last = dict(frames=0, tokens=0, bytes_read=0, seconds=0.0, stamps=[])
        if not self.archive.frames:
            return 0
        queries, positions = probe_queries(session, chunk, question_tokens)
        self._question = (session, chunk, question_tokens)
        try:
            picked = sorted(self.choose(cache, queries, positions))  # oldest first: their order in time is kept
        finally:
            self._question = None
        got = []
        for f in picked:
            kv = self.archive.get(f, dtype=cache.keys.dtype)
            if kv is not None:  # a damaged page is skipped (counted in the archive)
                got.append((f, *kv))
        seen0 = cache.seen
        tokens = insert_frames(cache, [(k, v, p) for _, k, v, p in got], before_held=self.placement == "past")
        end = seen0
        for f, k, _v, _p in got:  # memory view: the recalled tokens are frames, with their archived stamps
            end += k.shape[2]
            session.chunk_map.mark("frame", end, k.shape[2], stamp=self.archive.frames[f].stamp)
        if tokens:
            self.active = (cache.stored - tokens, tokens)
            self.recalls += 1
        self.last = dict(frames=len(got), tokens=tokens, stamps=[self.archive.frames[f].stamp for f, *_ in got],
                         bytes_read=sum(self.archive.frames[f].nbytes for f, *_ in got),
                         seconds=time.perf_counter() - t0)
        return tokens

    def release(self, cache) -> None:
        """After the answer: compact the recalled slots out, then the question's deferred eviction."""
        if self.active is None:
            return
        first, count = self.active
        self.active = None
        remove_slots(cache, first, count)
        for layer in cache.layers:
            layer.scored = layer.stored  # the answer's tokens: window score 0 (as after any answer)
        cache.end_chunk()

    def stats(self) -> dict:
        return dict(archive=self.archive.stats(), recalls=self.recalls, last_recall=dict(self.last))


def _words(text: str) -> frozenset[str]:
    return frozenset(w.strip("?.,!:;\"'") for w in text.lower().split()) - STOP_WORDS - {""}


# ---- cache operations (on the cache's stacked tensors; the cache itself is not changed) ---------------------------
def probe_queries(session, chunk, question_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The question's queries [layers, q_heads, question_tokens, D] (rotated at their positions) and those positions
    [question_tokens] (text: every M-RoPE row equal), from one forward of the question chunk that is then rolled
    back: the cache is left as it was (slots past `stored` are free)."""
    queries, positions, _logits = probe_forward(session, chunk, question_tokens)
    return queries, positions


def probe_forward(session, chunk, question_tokens: int, frames=(), before_held: bool = True, capture: bool = True,
                  steps: int = 1):
    """One forward of the question chunk over the held cache (plus `frames`, archived (keys, values, positions),
    inserted first as `insert_frames` does), then everything rolled back: the cache's state and its slots
    [0, stored) are left bit-identical (slots past `stored` are free). Returns (queries [layers, q_heads,
    question_tokens, D] or None without capture, question positions [question_tokens], logits [steps, vocab] fp32
    of the first `steps` greedy answer tokens (steps > 1: the greedy tokens are fed, then rolled back too))."""
    cache = session.cache
    n = cache.stored
    saved = dict(stored=[la.stored for la in cache.layers], seen=[la.seen for la in cache.layers],
                 scored=[la.scored for la in cache.layers], next_position=cache.next_position, chunks=cache.chunks,
                 decoded=cache.decoded, prefill=cache.prefill, turned=cache.turned,
                 window=cache.window[..., :n].clone(), accumulated=cache.accumulated[..., :n].clone())
    captured: dict[int, torch.Tensor] = {}

    def hook(layer_idx, query, key, scale):
        captured[layer_idx] = query[0, :, -question_tokens:].detach().float().cpu()

    previous = getattr(cache, "attention_probe", None)
    inserted = 0
    try:
        inserted = insert_frames(cache, list(frames), before_held=before_held) if frames else 0
        ids = chunk.ids.to(session.device)
        pos = session.adapter.positions(chunk, cache.next_position)
        kwargs = {k: v.to(session.device) for k, v in chunk.model_kwargs.items() if isinstance(v, torch.Tensor)}
        if capture:
            cache.attention_probe = hook
        out = [session._forward(ids, pos.to(session.device), prefill=True, **kwargs).float().cpu()]
        cache.attention_probe = previous
        for _ in range(steps - 1):
            tok = torch.tensor([[int(out[-1].argmax())]], dtype=torch.long, device=session.device)
            step_pos = session.adapter.decode_positions(cache.next_position, session.device)
            out.append(session._forward(tok, step_pos, prefill=False).float().cpu())
        logits = torch.stack(out)
    finally:
        cache.attention_probe = previous
        for la, st, se, sc in zip(cache.layers, saved["stored"], saved["seen"], saved["scored"], strict=True):
            la.stored, la.seen, la.scored = st, se, sc
        for name in ("next_position", "chunks", "decoded", "prefill"):
            setattr(cache, name, saved[name])
        cache.window[..., :n] = saved["window"]
        cache.accumulated[..., :n] = saved["accumulated"]
        cache._pending = None
        if inserted:
            _keys_changed(cache)  # the read copy held the inserted keys: rebuilt from keys + offset at the next read
        cache.turned = saved["turned"]
    positions = pos.reshape(-1, pos.shape[-1])[0, -question_tokens:].cpu()
    queries = torch.stack([captured[i] for i in range(len(cache.layers))]) if capture else None
    return queries, positions, logits


def insert_frames(cache, frames, before_held: bool = False) -> int:
    """Append archived frames (keys/values [layers, H, n, D] rotated at their original positions, positions [n, rows])
    after the stored slots, one after the other at the positions after next_position (before_held: at the positions
    just before the oldest held token, so they read as older than everything held). Returns the tokens added."""
    s, start = cache.stored, cache.next_position
    spans = sum(int(p.max()) - int(p.min()) + 1 for _, _, p in frames)
    if before_held:
        start = (int(cache.pos[:, :, :s].min()) if s else 0) - spans
    total = 0
    for keys, values, positions in frames:
        n = keys.shape[2]
        lo, hi = int(positions.min()), int(positions.max())
        delta = start - lo  # the same shift for every token and every M-RoPE row: the frame's layout is kept
        sl = slice(s + total, s + total + n)
        cache.keys[:, :, sl] = keys.to(cache.keys.device, cache.keys.dtype)
        cache.values[:, :, sl] = values.to(cache.values.device, cache.values.dtype)
        cache.pos[:, :, sl] = (positions + delta).to(cache.pos.device)  # [n, rows] broadcast over layers, heads
        cache.offset[:, :, sl] = delta  # scalar: fits [layers, H, cap] and [layers, H, cap, rows] alike
        seen = cache.seen + total
        cache.index[:, :, sl] = torch.arange(seen, seen + n, device=cache.index.device)
        cache.chunk[:, :, sl] = cache.chunks
        cache.window[:, :, sl] = 0
        cache.accumulated[:, :, sl] = 0
        start += hi - lo + 1
        total += n
    if total:
        for layer in cache.layers:
            layer.stored += total
            layer.seen += total
            layer.scored = layer.stored
        if not before_held:
            cache.next_position = start
        cache.turned = True  # the recalled keys sit at positions other than the ones they were rotated at
        _keys_changed(cache)
    return total


def remove_slots(cache, first: int, count: int) -> None:
    """Drop slots [first, first + count) of every layer and head; the slots after them move down, in order."""
    n = cache.stored
    for name in SLOT_TENSORS:
        t = getattr(cache, name)
        t[:, :, first:n - count] = t[:, :, first + count:n].clone()
    for layer in cache.layers:
        layer.stored -= count
        layer.scored = min(layer.scored, layer.stored)
    _keys_changed(cache)


def _keys_changed(cache) -> None:
    """Keys / offsets were written outside update and end_chunk: the cache's read copy of the keys (kept on CPU,
    BoundedCache.read_copy) is rebuilt from them at each layer's next read."""
    if hasattr(cache, "invalidate_read_keys"):
        cache.invalidate_read_keys()

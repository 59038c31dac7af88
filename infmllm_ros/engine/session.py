"""StreamingSession: one continuous vision-language session over a transformers VLM, on the bounded KV cache.

Every input becomes one prefill chunk with explicit positions (next free position + offsets from the family's
adapter), then the cache evicts once (`end_chunk`). Frames are encoded once and never re-fed; answers are decoded
token by token (no eviction per token) and stay in the cache as part of the conversation.

Pending tokens (the system turn, an answer's last token and its closing text) join the next chunk. When the two
together pass max_chunk, the pending tokens go first in a forward that does not evict: an eviction is only ever
voted by a real chunk (a frame, a question), never by the 2-3 queries of a turn's closing tokens. The cache gets
room for that closing text on top of max_new_tokens (`answer_tail` slots per layer).
"""

from __future__ import annotations

import logging
import math
import numbers
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from infmllm_ros import attention
from infmllm_ros.cache import BoundedCache, CacheConfig
from infmllm_ros.engine import frames, loading, memory, memory_view, snapshot
from infmllm_ros.engine.adapters import Chunk, adapter_for
from infmllm_ros.engine.errors import CacheFullError, InvalidFrameError, InvalidInstructionError
from infmllm_ros.engine.sampling import choose, mask_logits, penalize_repeats
from infmllm_ros.memory.recall import FrameRecall

RECALL_MARKER_MARGIN = 8  # tokens per recall slot group beyond a stamp-0 frame chunk (see __init__)

log = logging.getLogger(__name__)


@dataclass
class Answer:
    text: str  # decoded answer, special tokens and any stop string removed
    tokens: list[int]  # every generated id (EOS / the token completing a stop string included)
    frame_stamp: float | None  # stamp of the newest frame in the cache when the question was asked
    latency_s: float  # question prefill + decoding
    cache: dict  # cache stats after the answer
    finish_reason: str = "length"  # "eos" | "stop" | "length" | "cache_full" (policy "full" ran out of slots)
    first_token_s: float = 0.0  # question prefill + first token choice
    logits: torch.Tensor | None = None  # (n_tokens, vocab) raw logits per step, only with output_logits=True
    evidence: dict | None = None  # frames the question attended to most (memory_view.EvidenceProbe.evidence)


@dataclass
class _Counters:
    frames_seen: int = 0
    questions: int = 0
    last_stamp: float | None = None
    first_stamp: float | None = None  # time markers are relative to the first frame since reset
    last_frame_tokens: int = 0
    last_frame_latency_s: float = 0.0
    last_question_tokens: int = 0
    last_answer_latency_s: float = 0.0
    last_first_token_s: float = 0.0
    truncations: int = 0
    fed_ids: list[int] = field(default_factory=list)  # only with trace=True


class StreamingSession:
    def __init__(self, model, processor, cache: CacheConfig | None = None, *, device=None, dtype=None,
                 system_prompt: str | None = None, seed: int = 0, suppress_tokens=(), frame_max_side: int | None = None,
                 frame_min_side: int | None = None, frame_tokens: int | None = None, check_memory: bool = True,
                 memory_headroom: float = 0.1, recall_frames: int = 0, archive_mb: float = 256.0,
                 archive_dir: str | None = None, recall_placement: str = "past", trace: bool = False):
        self.cfg = cache if cache is not None else CacheConfig()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if dtype is not None or device is not None:
            model = model.to(device=self.device, dtype=dtype)
        self.dtype = dtype or next(model.parameters()).dtype
        self.model, self.processor = model.eval(), processor
        self.adapter = adapter_for(model, processor)
        # frame.tokens / frame.max_side -> the family's processor knobs; None keeps the adapter's stream defaults
        self.adapter.configure_frames(frame_tokens, frame_max_side)
        self.tokens_per_frame = self.adapter.frame_chunk_tokens(self.adapter.REFERENCE_SHAPES[0])
        self.max_frame_tokens = max(self.adapter.frame_chunk_tokens(s) for s in self.adapter.REFERENCE_SHAPES)
        log.info("%s: %d tokens per 640x480 frame (at most %d over the reference shapes)",
                 type(self.adapter).__name__, self.tokens_per_frame, self.max_frame_tokens)
        self.tokenizer = processor.tokenizer
        # an answer's closing text may have to wait in the cache beside the answer (see the module docstring)
        self.answer_tail = len(self.adapter.encode(self.adapter.close_text()))
        # long-term memory (memory/recall.py): slots for recall_frames archived frames, reserved in the capacity;
        # the time marker's digits grow with the stamp, hence the margin over the stamp-0 chunk length
        recall_slots = int(recall_frames) * (self.max_frame_tokens + RECALL_MARKER_MARGIN) if recall_frames else 0
        self.cache_cfg = replace(self.cfg, max_new_tokens=self.cfg.max_new_tokens + self.answer_tail,
                                 recall_slots=self.cfg.recall_slots + recall_slots)
        # on CPU the cache also keeps the keys as attention reads them (BoundedCache read_copy): counted here too
        self.kv_bytes = int(BoundedCache.kv_bytes_for(self.cache_cfg, model.config, self.dtype,
                                                      read_copy=self.device.type != "cuda"))
        if check_memory:  # weights are resident already; the KV buffers must still fit
            memory.check_fits(self.kv_bytes, self.device, "KV cache buffers", memory_headroom)
        attention.install(model)
        self.cache = BoundedCache(self.cache_cfg, model.config, self.device, self.dtype)
        self.recall = (FrameRecall(self.cache, int(recall_frames), recall_slots, archive_mb, archive_dir,
                                   recall_placement) if recall_frames else None)
        lo, hi = self.adapter.frame_bounds()
        self.frame_min_side, self.frame_max_side = frame_min_side or lo, frame_max_side or hi
        self.system_prompt, self.seed, self.trace = system_prompt, seed, trace
        self.suppress = torch.tensor(sorted(set(suppress_tokens) | set(self.adapter.never_generate())),
                                     dtype=torch.long, device=self.device)
        self.eos_ids = self._eos_ids()
        # the checkpoint's own generation_config values (only those it sets; HF's implicit top_k=50 is not applied)
        gen = getattr(model, "generation_config", None)
        gen = gen.to_diff_dict() if gen is not None else {}
        self.top_k = int(gen.get("top_k") or 0)
        self.repetition_penalty = float(gen.get("repetition_penalty") or 1.0)
        self.generator = torch.Generator().manual_seed(seed)
        self._prefix_ids = self._truncate(self.adapter.encode(self.adapter.prefix_text(system_prompt)),
                                          self.cfg.max_chunk, "system prompt")
        self.reset()

    @classmethod
    def from_pretrained(cls, path: str, cache: CacheConfig | None = None, device: str = "cpu", dtype=None,
                        check_memory: bool = True, memory_headroom: float = 0.1, **kwargs) -> StreamingSession:
        """Load a local dir or hub id; refuse before loading if weights + KV budget cannot fit the device."""
        cfg = cache if cache is not None else CacheConfig()
        dtype = dtype or loading.auto_dtype(loading.check_source(path) or path, device)
        if check_memory:
            from transformers import AutoConfig

            n_params = memory.weight_params(path)
            if n_params is not None:
                elem = torch.empty((), dtype=dtype).element_size()
                need = n_params * elem + BoundedCache.kv_bytes_for(cfg, AutoConfig.from_pretrained(path), dtype,
                                                                   read_copy=torch.device(device).type != "cuda")
                memory.check_fits(need, device, "weights + KV cache buffers", memory_headroom)
        model, processor = loading.load(path, device=device, dtype=dtype)
        return cls(model, processor, cache=cfg, device=device, dtype=dtype, check_memory=check_memory,
                   memory_headroom=memory_headroom, **kwargs)

    # -- public API ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def observe(self, frame, stamp: float) -> int:
        """Prefill one camera frame (HxWx3 uint8 RGB; see frames.py for accepted variants). Returns its token count."""
        t0 = time.perf_counter()
        self._check_usable()
        if isinstance(stamp, bool) or not isinstance(stamp, numbers.Real) or not math.isfinite(stamp):
            raise InvalidFrameError(f"stamp must be a finite number of seconds, got {stamp!r}")
        img = frames.fit(frames.to_rgb(frame), self.frame_min_side, self.frame_max_side)
        # why relative: header stamps are epoch seconds; "t=1764150000.1s" costs tokens and means nothing to a model
        origin = self.counters.first_stamp if self.counters.first_stamp is not None else float(stamp)
        chunk = self.adapter.encode_images(self.adapter.frame_text(float(stamp) - origin), [img])
        if chunk.length > self.cfg.max_chunk:
            raise InvalidFrameError(
                f"one frame is {chunk.length} tokens > cache max_chunk {self.cfg.max_chunk}: set node parameter "
                f"cache.max_chunk to {chunk.length} or more (0 = auto), or lower frame.tokens / frame.max_side "
                f"(CacheConfig.max_chunk / frame_tokens / frame_max_side in Python)")
        if len(self._pending) + chunk.length > self.cfg.max_chunk:
            self._feed_pending_ahead(chunk.length)
        archive = (lambda: self.recall.archive_frame(self.cache, chunk.length, float(stamp))) if self.recall else None
        self._prefill(self._with_pending(chunk), before_evict=archive)
        self.chunk_map.mark("frame", int(self.cache.get_seq_length()), chunk.length, stamp=float(stamp))  # memory view
        c = self.counters
        c.first_stamp = origin
        c.frames_seen += 1
        c.last_stamp = float(stamp)
        c.last_frame_tokens = chunk.length
        c.last_frame_latency_s = time.perf_counter() - t0
        return chunk.length

    @torch.inference_mode()
    def ask(self, text: str, max_new_tokens: int = 32, on_token: Callable[[str], None] | None = None,
            temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
            allowed_tokens_fn: Callable[[list[int]], list[int]] | None = None, seed: int | None = None,
            output_logits: bool = False) -> Answer:
        """Prefill the question as one chunk, then decode. Greedy at temperature 0, else top-p sampling."""
        t0 = time.perf_counter()
        self._check_usable()
        user = self._check_instruction(text)
        if temperature < 0 or not 0.0 < top_p <= 1.0:
            raise InvalidInstructionError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if max_new_tokens < 1:
            raise InvalidInstructionError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_new_tokens > self.cfg.max_new_tokens:
            warnings.warn(f"max_new_tokens {max_new_tokens} > cache max_new_tokens {self.cfg.max_new_tokens}; "
                          "clipped", stacklevel=3)  # 3: past the inference_mode wrapper
            max_new_tokens = self.cfg.max_new_tokens
        stops = [s for s in (stop or []) if s]
        open_, close_ = self.adapter.question_wrap()
        head, tail = self.adapter.encode(open_), self.adapter.encode(close_)
        ahead = len(self._pending) + len(head) + len(tail) + 1 > self.cfg.max_chunk  # pending goes first, no eviction
        room = self.cfg.max_chunk - (0 if ahead else len(self._pending)) - len(head) - len(tail)
        if room < 1:
            raise InvalidInstructionError(f"cache max_chunk {self.cfg.max_chunk} leaves no room for an instruction")
        if len(user) > room:
            self.counters.truncations += 1
            warnings.warn(f"instruction of {len(user)} tokens truncated to {room} (cache max_chunk "
                          f"{self.cfg.max_chunk})", stacklevel=3)
            user = user[:room]
        if ahead:
            self._feed_pending_ahead(len(head) + len(user) + len(tail))
        if seed is not None:
            self.generator.manual_seed(seed)
        ids = torch.tensor([head + user + tail], dtype=torch.long)
        chunk = self._with_pending(Chunk(ids=ids, mm_token_type_ids=torch.zeros_like(ids)))
        # long-term memory: archived frames into the reserved slots; the question's eviction waits for the release
        recalled = self.recall.before_question(self, chunk, ids.shape[1]) if self.recall else 0
        try:
            with memory_view.probing(self.cache, ids.shape[1]) as probe:  # memory view: the question's attention mass
                logits = self._prefill(chunk, evict=not recalled)
        except BaseException:
            if recalled and not self._broken:  # refused before its forward (cache full): the slots go back
                self._release_recall()
            raise
        question = self.chunk_map.mark("instruction", int(self.cache.get_seq_length()), ids.shape[1], text=text)
        self.counters.questions += 1
        self.counters.last_question_tokens = ids.shape[1]

        tokens: list[int] = []
        steps: list[torch.Tensor] = []
        emitted, finish, text_out, first_token_s, n_fed = 0, "length", "", 0.0, 0
        try:
            while True:
                if output_logits:
                    steps.append(logits.float().cpu())
                # a bitmask constraint (action_grammar) masks the logits in place; a plain one lists allowed ids
                in_place = getattr(allowed_tokens_fn, "apply_", None)
                allowed = allowed_tokens_fn(list(tokens)) if allowed_tokens_fn is not None and not in_place else None
                mask_fn = (lambda out, f=in_place, prefix=list(tokens): f(prefix, out)) if in_place else None
                masked = penalize_repeats(mask_logits(logits, self.suppress, allowed, mask_fn), tokens,
                                          self.repetition_penalty)
                tok = choose(masked, temperature, top_p, self.generator, self.top_k)
                tokens.append(tok)
                if len(tokens) == 1:
                    first_token_s = time.perf_counter() - t0
                text_out = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if tok in self.eos_ids:
                    finish = "eos"
                for s in stops:
                    i = text_out.find(s)
                    if i >= 0:
                        text_out, finish = text_out[:i], "stop"
                if finish == "length" and len(tokens) < max_new_tokens and self._free_slots() < 1:
                    finish = "cache_full"  # only a non-evicting cache gets here
                done = finish != "length" or len(tokens) >= max_new_tokens
                if on_token is not None:
                    safe = len(text_out) if done else _safe_end(text_out, stops)
                    if safe > emitted:
                        on_token(text_out[emitted:safe])
                        emitted = safe
                if done:
                    break
                logits = self._decode_one(tok)  # fed tokens stay in the cache; no eviction per token
                n_fed += 1
        finally:
            if recalled:
                self._release_recall()
            # Unfed tokens (normally just the last one) + the turn's closing text go in front of the next chunk,
            # also when a callback raised, so the conversation in the cache stays well formed.
            close = self.adapter.encode(self.adapter.close_text())
            if tokens and tokens[-1] in self.eos_ids and close[:1] == [tokens[-1]]:
                close = close[1:]
            self._pending = tokens[n_fed:] + close
            self.chunk_map.mark("answer", int(self.cache.get_seq_length()), n_fed, text=text_out)  # memory view
        latency = time.perf_counter() - t0
        self.counters.last_answer_latency_s, self.counters.last_first_token_s = latency, first_token_s
        return Answer(text=text_out, tokens=tokens, frame_stamp=self.counters.last_stamp, latency_s=latency,
                      cache=dict(self.cache.stats()), finish_reason=finish, first_token_s=first_token_s,
                      logits=torch.stack(steps) if output_logits else None,
                      evidence=probe.evidence(self.chunk_map, question))

    def reset(self) -> None:
        """Forget everything: empty cache, positions from 0, model position state cleared, generator reseeded.
        With recall, the archive is emptied too (its folder cleared)."""
        self.cache.reset()
        if self.recall is not None:
            self.recall.reset()
        self.adapter.reset()
        self.generator.manual_seed(self.seed)
        self._pending = list(self._prefix_ids)
        self.counters = _Counters()
        self.chunk_map = memory_view.ChunkMap(lambda: memory_view.kept_indices(self.cache), 4 * self.cfg.capacity,
                                              self.system_prompt or "")  # memory view: stream index -> frame / turn
        self._broken: str | None = None

    def save(self, path) -> dict:
        """Write the whole session (cache, stream state, archive index) to `path` atomically (engine/snapshot.py).
        Returns {"path", "bytes", "frames_seen", "tokens_stored"}; SnapshotError if it cannot."""
        return snapshot.save(self, path)

    def restore(self, path) -> dict:
        """Resume from a snapshot written by save() with the same model, cache config and dtype. Returns its header;
        on a mismatch or a damaged file raises SnapshotError and leaves the session reset (a fresh start)."""
        return snapshot.restore(self, path)

    def memory(self) -> dict:
        """What the cache still holds, per frame and text turn, with totals (see engine/memory_view.py)."""
        return memory_view.memory(self)

    def stats(self) -> dict:
        c, cs = self.counters, dict(self.cache.stats())
        return dict(frames_seen=c.frames_seen, questions=c.questions, tokens_seen=int(self.cache.get_seq_length()),
                    tokens_stored=int(self.cache.stored), kv_bytes=cs.get("kv_bytes", self.kv_bytes),
                    kv_bytes_budget=self.kv_bytes, next_position=int(self.cache.next_position),
                    last_stamp=c.last_stamp, last_frame_tokens=c.last_frame_tokens,
                    last_frame_latency_s=c.last_frame_latency_s, last_question_tokens=c.last_question_tokens,
                    last_answer_latency_s=c.last_answer_latency_s, last_first_token_s=c.last_first_token_s,
                    truncations=c.truncations, tokens_per_frame=self.tokens_per_frame, cache=cs,
                    recall=self.recall.stats() if self.recall is not None else None)

    @property
    def archive(self):
        """The FrameArchive of past frames' K/V (memory.recall_frames > 0), else None."""
        return self.recall.archive if self.recall is not None else None

    @property
    def fed_ids(self) -> list[int]:
        """Every id fed to the model since reset, in order (only with trace=True)."""
        return self.counters.fed_ids

    # -- internals -----------------------------------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        gen = getattr(self.model, "generation_config", None)
        e = getattr(gen, "eos_token_id", None)
        ids |= set(e) if isinstance(e, (list, tuple)) else ({e} if e is not None else set())
        return ids

    def _check_instruction(self, text) -> list[int]:
        if not isinstance(text, str):
            raise InvalidInstructionError(f"instruction must be a str, got {type(text).__name__}")
        clean = text.replace("\x00", "").strip()
        if not clean:
            raise InvalidInstructionError("instruction is empty or whitespace only")
        return self.adapter.encode_user(clean)

    def _free_slots(self) -> int:
        # Evicting policies always leave room (stored <= budget after each chunk); "full" can run out.
        return self.cache_cfg.capacity - int(self.cache.stored)

    def _truncate(self, ids: list[int], limit: int, what: str) -> list[int]:
        if len(ids) > limit:
            warnings.warn(f"{what} of {len(ids)} tokens truncated to cache max_chunk {limit}", stacklevel=3)
            return ids[:limit]
        return ids

    def _with_pending(self, chunk: Chunk) -> Chunk:
        if not self._pending:
            return chunk
        pre = torch.tensor([self._pending], dtype=torch.long)
        mm = chunk.mm_token_type_ids if chunk.mm_token_type_ids is not None else torch.zeros_like(chunk.ids)
        return Chunk(ids=torch.cat([pre, chunk.ids], 1), model_kwargs=chunk.model_kwargs,
                     mm_token_type_ids=torch.cat([torch.zeros_like(pre), mm.to(pre.dtype)], 1))

    def _feed_pending_ahead(self, next_length: int) -> None:
        """Pending tokens that do not fit beside the next chunk (of next_length tokens): one forward without eviction,
        so the eviction after the next chunk counts them in. After an answer they always fit (stored <= budget +
        answer - 1, + the tail, + max_chunk <= capacity). Only the system turn at the start of a stream, when it is
        larger than budget + max_new_tokens, is still prefilled as a chunk of its own (the stream is that short)."""
        if not self._pending:
            return
        ids = torch.tensor([self._pending], dtype=torch.long)
        chunk = Chunk(ids=ids, mm_token_type_ids=torch.zeros_like(ids))
        if len(self._pending) + next_length > self._free_slots():
            self._prefill(chunk)
        else:
            self._prefill(chunk, evict=False)

    def _prefill(self, chunk: Chunk, evict: bool = True, before_evict: Callable[[], object] | None = None
                 ) -> torch.Tensor:
        if chunk.length > self._free_slots():
            raise CacheFullError(
                f"the cache holds {int(self.cache.stored)} of {self.cache_cfg.capacity} slots and the next chunk needs "
                f"{chunk.length}: policy {self.cfg.policy!r} did not evict; call reset() or use an evicting policy")
        self._pending = []
        ids = chunk.ids.to(self.device)
        pos = self.adapter.positions(Chunk(ids, chunk.model_kwargs, chunk.mm_token_type_ids), self.cache.next_position)
        kwargs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  if isinstance(v, torch.Tensor) else v for k, v in chunk.model_kwargs.items()}
        logits = self._forward(ids, pos.to(self.device), prefill=True, **kwargs)
        try:
            if before_evict is not None:
                before_evict()
            if evict:
                self.cache.end_chunk()
        except BaseException as e:
            self._broken = f"end_chunk: {type(e).__name__}: {e}"
            raise
        if self.trace:
            self.counters.fed_ids.extend(ids[0].tolist())
        return logits

    def _release_recall(self) -> None:
        try:
            self.recall.release(self.cache)
        except BaseException as e:
            self._broken = f"recall release: {type(e).__name__}: {e}"
            raise

    def _decode_one(self, tok: int) -> torch.Tensor:
        ids = torch.tensor([[tok]], dtype=torch.long, device=self.device)
        if self.trace:
            self.counters.fed_ids.append(tok)
        return self._forward(ids, self.adapter.decode_positions(self.cache.next_position, self.device), prefill=False)

    def _forward(self, ids, pos, prefill: bool, **kwargs) -> torch.Tensor:
        try:
            self.cache.begin_forward(pos, prefill=prefill)
            out = self.model(input_ids=ids, position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=1,
                             **kwargs, **self.cache.forward_kwargs())
        except BaseException as e:  # a forward that died half way leaves the cache inconsistent: fail closed
            self._broken = f"{type(e).__name__}: {e}"
            raise
        return out.logits[0, -1]

    def _check_usable(self) -> None:
        if self._broken:
            raise RuntimeError(f"session state is inconsistent after a failed forward ({self._broken}); "
                               "call reset()")


def _safe_end(text: str, stops: list[str]) -> int:
    """Length of `text` that can be streamed: hold back a tail that may still grow into a stop string."""
    end = len(text)
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                end = min(end, len(text) - k)
                break
    return max(end, 0)

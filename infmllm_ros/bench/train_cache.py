"""Training questions over the real bounded cache (`infmllm-bench train-vlm --cache-train`).

Why: the evidence ranking and the past answers fall with stream length behind the saddle cache (issue 16: the top
evidence frame shows the asked object in 80 % of questions on whole 16-frame streams, 58 % on 96 frames at budget
128), while the cache still holds a patch of the asked object for 94 % of them. Synthetic thinning of the training
streams did not reproduce what the cache keeps (docs/world.md, "Tried"). So here the cache is the real one: a frozen
copy of the model being trained streams a long world episode through a `StreamingSession` (saddle policy, a budget
drawn per stream), and during each question's prefill what the question attends to is read out (`capturing`): per
layer the stored keys as attention reads them (turned to their current positions), the values, and which frame each
(layer, KV head, slot) came from, recalled frames included. The trained model then answers the question over
exactly those K/V (detached: a `DynamicCache` holding them, the question at the session's positions), with the
answer loss and the grounding loss of `train_vlm` on the cache's slots. The session answers each question itself
too (greedy), so the context goes on as deployed.

The gradient reaches the question's own computation (its queries, every layer's weights on its tokens), not the
frames' K/V: what the cache holds is what the model made of them when they were fed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from infmllm_ros import world
from infmllm_ros.bench.evidence import asked_object, shows
from infmllm_ros.engine import memory_view
from infmllm_ros.engine.memory_view import EVIDENCE_QUERIES

STAMP0 = 1000.0  # session stamps: any origin (the session stamps frames relative to the first)


@dataclass
class CacheExample:
    keys: list[torch.Tensor]  # per layer [1, H_kv, m, D], as attention reads them
    values: list[torch.Tensor]  # per layer [1, H_kv, m, D]
    start: int  # position of the question chunk's first token
    ids: list[int]  # the question chunk as fed (pending tokens + the question's turn) + answer + </s>
    labels: list[int]  # -100 outside the answer
    queries: list[int]  # the question's last EVIDENCE_QUERIES offsets in ids (what the evidence ranks by)
    frames: torch.Tensor | None  # [layers, H_kv, m] bool: slot holds a frame chunk's token; None: nothing to ground
    about: torch.Tensor | None  # [layers, H_kv, m] bool: slot holds a token of a frame the question is about


def spec_for(policy: str = "linear:1"):
    from infmllm_ros.bench import policies

    return policies.saddle_spec(*policies.parse_saddle(policy))


class CacheStreams:
    """A frozen copy of the trained model behind one session per budget; `examples` streams one episode.

    recall: the sessions also archive every frame and, for each question, recall the frame its answer comes from
    when the cache no longer holds it (the recall bench's oracle ranking), in the deployed "past" placement: the
    question then reads a recalled frame as it will with `memory.recall_frames` (issue 17)."""

    def __init__(self, model, proc, budgets=(128, 256, 512), frames=(24, 96), questions: int = 12,
                 policy: str = "linear:1", max_chunk: int = 256, max_new_tokens: int = 16, recall: bool = False):
        import copy

        from infmllm_ros.engine import StreamingSession

        self.shadow = copy.deepcopy(model).eval()
        for m in self.shadow.modules():  # the trainer's hooks (its auxiliary features) stay on the trained model
            m._forward_hooks.clear()
        spec = spec_for(policy)
        extra = dict(recall_frames=1, archive_mb=64.0) if recall else {}
        self.sessions = [StreamingSession(self.shadow, proc, cache=spec.cache_config(b, max_chunk, max_new_tokens),
                                          check_memory=False, **extra) for b in budgets]
        self.asked: dict = {}  # the oracle ranking's target: the stamp of the asked question's evidence frame
        if recall:
            from infmllm_ros.bench.recall_archive import oracle_choice

            for s in self.sessions:
                s.recall.choose = oracle_choice(s.recall, self.asked)
        self.frames, self.questions, self.max_new_tokens = frames, questions, max_new_tokens

    def sync(self, model) -> None:
        self.shadow.load_state_dict(model.state_dict())

    def examples(self, rng: np.random.Generator, enc, seed_base: int) -> list[CacheExample]:
        """Stream one episode (its length and the budget drawn from rng); one example per question."""
        session = self.sessions[int(rng.integers(len(self.sessions)))]
        n = int(rng.integers(self.frames[0], self.frames[1] + 1))
        seed = int(rng.integers(seed_base, 2**31 - 1))
        ep = world.make_episode(seed, n, self.questions)
        return [ex for ex, _ in stream(session, ep, enc, self.max_new_tokens, self.asked) if ex is not None]


def stream(session, ep: world.Episode, enc, max_new_tokens: int, asked: dict | None = None, **ask):
    """Stream the episode through the session, asking its questions (greedy); per question (the example read from
    the cache as the question's prefill saw it, or None; the session's Answer)."""
    by_frame: dict[int, list[world.Event]] = {}
    for e in ep.events:
        by_frame.setdefault(e.frame, []).append(e)
    last = max((e.frame for e in ep.events), default=-1)
    session.reset()
    out = []
    for f in ep.frames[:last + 1]:
        session.observe(f.rgb, STAMP0 + f.t)
        for e in by_frame.get(f.index, []):
            if asked is not None:
                asked["stamp"] = STAMP0 + ep.frames[e.seen_frame].t if e.seen_frame is not None else None
            pending = list(session._pending)  # the chunk's head, unless ask feeds it ahead (then the slice drops it)
            with capturing(session) as seen:
                answer = session.ask(e.question, max_new_tokens=max_new_tokens, temperature=0.0, **ask)
            out.append((example_of(seen, pending, ep, f.index, e, enc), answer))
    return out


@contextmanager
def capturing(session):
    """While the block runs `session.ask`, record what the question's prefill attends to: per layer the stored keys
    as attention reads them (the `key` the attention function gets, minus the question's own), the values, the
    slots' stream indices mapped to frames (recalled frames included), and the chunk's first position and length.
    Hooks in where `Answer.evidence` does (`memory_view.probing`, the question prefill only)."""
    seen: dict = {}
    original = memory_view.probing
    spans_of = session.chunk_map

    @contextmanager
    def probing(cache, n_queries):
        with original(cache, n_queries) as probe:
            def grab(layer_idx, query, key, scaling):
                probe(layer_idx, query, key, scaling)
                n, q = key.shape[-2], query.shape[-2]
                layer = cache.layers[layer_idx]
                with torch.no_grad():  # clones leave inference mode's tensors behind: plain tensors, no graph
                    seen.setdefault("keys", {})[layer_idx] = key[:, :, :n - q].clone()
                    seen.setdefault("values", {})[layer_idx] = layer.values[:, :, :n - q].clone()
                    seen.setdefault("index", {})[layer_idx] = layer.index[:, :n - q].clone()
                seen.update(start=int(cache._pending[0, 0]), length=q,
                            spans=[(sp.kind, sp.stamp) for sp in spans_of.spans],
                            starts=torch.tensor([sp.start for sp in spans_of.spans], dtype=torch.long))
            cache.attention_probe = grab
            yield probe

    memory_view.probing = probing
    try:
        yield seen
    finally:
        memory_view.probing = original


def example_of(seen: dict, pending: list[int], ep: world.Episode, now: int, e: world.Event, enc
               ) -> CacheExample | None:
    """The captured question prefill as a training example (None if nothing was captured). Its ids: the last
    `length` ids of pending + the question's turn (what `ask` fed as one chunk)."""
    if "keys" not in seen:
        return None
    layers = sorted(seen["keys"])
    question = pending + enc.q_head + enc.adapter.encode_user(e.question) + enc.q_tail
    q = seen["length"]
    index = torch.stack([seen["index"][i] for i in layers])  # [layers, H, m]
    span_of = (torch.bucketize(index, seen["starts"], right=True) - 1).clamp(min=0)
    index_of = {STAMP0 + f.t: f.index for f in ep.frames}
    frame_no = torch.tensor([index_of.get(stamp, -1) if kind == "frame" else -1 for kind, stamp in seen["spans"]],
                            dtype=torch.long)
    slot_frame = frame_no[span_of]  # [layers, H, m]: frame of each slot, -1 for text
    held = sorted({int(i) for i in slot_frame.unique().tolist() if i >= 0})
    about = grounded(ep, held, now, e)
    answer = enc.answer_ids(e.answer)
    ids = question[-q:]
    return CacheExample([seen["keys"][i] for i in layers], [seen["values"][i] for i in layers], seen["start"],
                        ids + answer, [-100] * q + answer, list(range(q - EVIDENCE_QUERIES, q)),
                        slot_frame >= 0 if about else None,
                        torch.isin(slot_frame, torch.tensor(about, dtype=torch.long)) if about else None)


def grounded(ep: world.Episode, held: list[int], now: int, e: world.Event) -> list[int]:
    """Held frames the question is about (as `train_vlm.grounding_frames`): the newest for a current question,
    every frame showing the named object for a past one; none when that would not single anything out."""
    if len(held) < 2:
        return []
    if e.kind == "current":
        return [now] if now in held else []
    if e.kind != "past":
        return []
    pred = asked_object(e.question)
    about = [i for i in held if shows(ep.frames[i], pred)]
    return about if len(about) < len(held) else []


def example_loss(model, ex: CacheExample, ground: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(answer loss, grounding loss or None) of the trained model over the example's cache contents."""
    from transformers import DynamicCache

    past = DynamicCache(config=model.config.text_config)
    for i, (k, v) in enumerate(zip(ex.keys, ex.values, strict=True)):
        past.update(k, v, i)
    ids = torch.tensor([ex.ids])
    pos = ex.start + torch.arange(ids.shape[1])[None]
    grounding = ground and ex.about is not None
    out = model(input_ids=ids, position_ids=pos, cache=past, labels=torch.tensor([ex.labels]),
                use_cache=True, output_attentions=grounding)
    if not grounding:
        return out.loss, None
    m = ex.keys[0].shape[-2]
    layers = out.attentions[len(out.attentions) // 2:]
    first = len(out.attentions) // 2
    on_frames = on_about = 0.0
    for j, a in enumerate(layers):  # a [1, H_q, q, m + q]
        heads = a.shape[1]
        kv = ex.keys[0].shape[1]
        mass = a[0, :, ex.queries, :m].float().sum(1).view(kv, heads // kv, m).sum(1)  # [H_kv, m]
        on_frames = on_frames + (mass * ex.frames[first + j]).sum()
        on_about = on_about + (mass * ex.about[first + j]).sum()
    return out.loss, torch.log(on_frames + 1e-6) - torch.log(on_about + 1e-6)

"""Cache-shaped training streams for `infmllm-bench train-vlm --cache-share`: long streams fed the way the bounded
cache holds them at question time.

Why: trained on whole streams of up to 16 frames, the embedded VLM grounds a question's attention in the right
frames on streams that short (the evidence bench: 80 % at 16 frames, chance 50 %), less on 32 frames (60 %, chance
33 %) and 53 % on the bench's 96-frame streams, where the saddle cache holds ~27 frames mostly as a few tokens each.
A cache-shaped stream has `n` frames (more than the whole streams have), its last `tail` frames whole with the
questions after them, and every older frame thinned to what a bounded cache keeps of it: each image token of an
object kept with probability p_obj, of the background with p_bg, each text token with p_text (one draw per stream,
so streams range from a few tokens per old frame to nearly whole ones). The kept tokens are fed contiguously (the
cache's "reindex" positions). One approximation: the kept tokens' keys are computed over the kept past only, where
the cache computed them over the whole past before evicting.

Recall (`recall_share` of the streams): one past question, its evidence frame (`Event.seen_frame`, thinned in place
like the others) also fed whole right after the prefix, where `FrameRecall`'s default "past" placement puts a
recalled frame (positions before every held token but the sinks), so the model learns to read a recalled frame.

The tokens are moved in embedding space (`fed_inputs`): the images go through the vision tower in stream order as
usual, and `Sample.order` lists the source positions fed.
"""

from __future__ import annotations

import numpy as np
import torch

from infmllm_ros import world
from infmllm_ros.bench import train_vlm as tv

TAIL_FRAMES = (1, 3)  # whole frames at the end (the cache's recent window), inclusive range
QUESTIONS = (1, 4)  # questions after the tail frames, inclusive range
PAST_SHARE = 0.6  # share of those questions that are about the past (the ones thinning makes hard)


def thin(s: tv.Sample, enc: tv.Encoder, rng: np.random.Generator, tail_from: int,
         recall_frame: int | None = None) -> tv.Sample:
    """`s` (a whole stream from `Encoder.sample`, questions only after frames >= tail_from) fed cache-shaped: frames
    before `tail_from` thinned, and `recall_frame`'s piece also fed whole right after the prefix."""
    p_obj, p_bg, p_text = rng.uniform(0.15, 1.0), rng.uniform(0.0, 0.4), rng.uniform(0.0, 0.8)
    ids = np.asarray(s.ids)
    keep = np.ones(len(ids), bool)
    background = len(tv.AUX_NAMES)
    for k, (a, b) in enumerate(s.frame_spans[:tail_from]):
        image = ids[a:b] == enc.image_id
        p = np.full(b - a, p_text)
        objects = s.patch_targets[k][:, tv._WHAT] != background if s.patch_targets else np.zeros(enc.n, bool)
        p[image] = np.where(objects, p_obj, p_bg)
        keep[a:b] = rng.random(b - a) < p
    order = np.flatnonzero(keep).tolist()
    head = len(enc.prefix)
    if recall_frame is not None:
        a, b = s.frame_spans[recall_frame]
        order = order[:head] + list(range(a, b)) + order[head:]
    where: dict[int, list[int]] = {}
    for fed, src in enumerate(order):
        where.setdefault(src, []).append(fed)

    def moved(positions):
        return sorted(f for p in positions for f in where.get(p, []))

    # every query of a grounded question is in the tail (fed once); its frames and about-frames are fed before it
    ground = [(moved(q), moved(frames), moved(about)) for q, frames, about in s.ground]
    labels = [s.labels[p] for p in order]
    spans = [(where[a][-1], where[b - 1][-1] + 1, kind) for a, b, kind in s.spans]
    return tv.Sample(s.ids, labels, s.images, spans, s.patch_targets, ground, s.frame_spans, order)


def cache_shaped_sample(rng: np.random.Generator, enc: tv.Encoder, n: int, recall: bool) -> tv.Sample:
    """A training stream of `n` frames, cache-shaped (see the module docstring); with `recall`, one past question
    whose evidence frame is thinned gets that frame recalled."""
    while True:
        seed = int(rng.integers(tv.TRAIN_SEED_BASE, 2**31 - 1))
        frames = list(world.World(seed).stream(n, world.FPS))
        tail_from = n - int(rng.integers(TAIL_FRAMES[0], TAIL_FRAMES[1] + 1))
        events = {}
        for _ in range(int(rng.integers(QUESTIONS[0], QUESTIONS[1] + 1))):
            kind = "past" if rng.random() < PAST_SHARE else str(rng.choice(["current", "action"]))
            e = world.ask(frames, int(rng.integers(tail_from, n)), kind, rng)
            if e is not None:
                events.setdefault((e.frame, e.question), e)  # the same question twice would let it copy itself
        events = sorted(events.values(), key=lambda e: e.frame)
        recall_frame = None
        if recall:
            events = [e for e in events if e.kind == "past" and e.seen_frame is not None and e.seen_frame < tail_from]
            if not events:
                continue
            events = events[-1:]
            recall_frame = events[0].seen_frame
        if events:
            offset = float(rng.integers(0, 240)) / 2 if rng.random() < 0.5 else 0.0
            last = events[-1].frame
            return thin(enc.sample(frames[:last + 1], events, offset), enc, rng, tail_from, recall_frame)


def fed_inputs(model, batch: dict) -> dict:
    """A collated cache-shaped batch -> the model's keyword arguments: the stream's embeddings with the image
    features in place (as LlavaModel.forward scatters them), gathered in `order`."""
    batch = dict(batch)
    ids, pixels, order = batch.pop("input_ids"), batch.pop("pixel_values"), batch.pop("order")
    cfg = model.config
    embeds = model.get_input_embeddings()(ids)
    features = model.model.get_image_features(
        pixel_values=pixels.to(embeds.dtype), vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True).pooler_output
    features = torch.cat(list(features), dim=0).to(embeds.dtype)
    embeds = embeds.masked_scatter((ids == cfg.image_token_id)[..., None], features)
    batch["inputs_embeds"] = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]))
    return batch

"""Cache-shaped training streams: what they feed (checked against the stream's own pieces), and the embedding path
that feeds them (checked against the model's plain forward over the same tokens)."""

import numpy as np
import pytest
import torch

from infmllm_ros import world
from infmllm_ros.bench import cache_shaped as cs
from infmllm_ros.bench import train_vlm as tv


@pytest.fixture(scope="module")
def tiny():
    model, proc = tv.build("tiny", seed=0)
    return model.eval(), proc, tv.Encoder(model, proc)


def _logits(model, **kw):
    with torch.no_grad():
        return model(**kw).logits


def _plain_batch(enc, ids, images):
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": torch.stack([enc.pixels(im) for im in images])}


def test_fed_inputs_equal_the_plain_forward_over_the_same_tokens(tiny):
    """Oracle: feeding all of a stream through `fed_inputs` (order = identity), or the stream without frame 2 and with
    frame 4 moved right after the prefix, gives the logits of the model's own forward over those ids and images."""
    model, proc, enc = tiny
    ep = world.make_episode(3, 6, 3)
    s = enc.sample(ep.frames, ep.events)
    s.order, s.labels = list(range(len(s.ids))), s.labels
    got = _logits(model, **cs.fed_inputs(model, tv.collate([s], enc, proc.tokenizer.pad_token_id)))
    torch.testing.assert_close(got, _logits(model, **_plain_batch(enc, s.ids, s.images)), atol=1e-5, rtol=1e-5)

    head = len(enc.prefix)
    (a2, b2), (a4, b4) = s.frame_spans[2], s.frame_spans[4]
    order = list(range(head)) + list(range(a4, b4)) + [p for p in range(head, len(s.ids)) if not a2 <= p < b2]
    moved = tv.Sample(s.ids, [s.labels[p] for p in order], s.images, order=order)
    got = _logits(model, **cs.fed_inputs(model, tv.collate([moved], enc, proc.tokenizer.pad_token_id)))
    images = [ep.frames[4].rgb] + [f.rgb for k, f in enumerate(ep.frames) if k != 2]
    want = _logits(model, **_plain_batch(enc, [s.ids[p] for p in order], images))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_thinned_stream_keeps_the_tail_whole_and_the_old_frames_in_order(tiny):
    _, proc, enc = tiny
    rng = np.random.Generator(np.random.PCG64(1))
    for _ in range(20):
        s = cs.cache_shaped_sample(rng, enc, 20, recall=False)
        fed = [s.ids[p] for p in s.order]
        assert s.order == sorted(s.order) and len(set(s.order)) == len(s.order)
        assert s.order[:len(enc.prefix)] == list(range(len(enc.prefix)))
        tail = next(k for k, (a, b) in enumerate(s.frame_spans) if all(p in s.order for p in range(a, b))
                    and all(all(p in s.order for p in range(a2, b2)) for a2, b2 in s.frame_spans[k:]))
        assert len(s.frame_spans) - tail <= cs.TAIL_FRAMES[1]
        start = s.frame_spans[tail][0]
        assert s.order[s.order.index(start):] == list(range(start, len(s.ids)))  # the tail and its turns, whole
        # labels: the answers, in fed coordinates
        picked = [t for t, lab in zip(fed, s.labels, strict=True) if lab != -100]
        assert picked == [lab for lab in s.labels if lab != -100]
        assert proc.tokenizer.decode(picked).count("</s>") == len(s.spans) >= 1
        for a, b, _ in s.spans:
            assert s.labels[a:b] == fed[a:b]
        for queries, frames, about in s.ground:  # the question's last tokens; image tokens fed before it
            assert queries == list(range(queries[0], queries[0] + len(queries)))
            assert set(about) <= set(frames) and all(fed[i] == enc.image_id for i in frames)
            assert max(frames) < queries[0]


def test_recalled_frame_is_fed_whole_after_the_prefix_and_grounds_the_question(tiny):
    _, proc, enc = tiny
    rng = np.random.Generator(np.random.PCG64(2))
    grounded = 0
    for _ in range(10):
        s = cs.cache_shaped_sample(rng, enc, 24, recall=True)
        assert len(s.spans) == 1 and s.spans[0][2] == "past"
        head = len(enc.prefix)
        recalled = [k for k, (a, b) in enumerate(s.frame_spans) if s.order[head:head + b - a] == list(range(a, b))]
        assert len(recalled) == 1
        a, b = s.frame_spans[recalled[0]]
        copy_pos = list(range(head, head + b - a))
        image_copy = [i for i in copy_pos if s.ids[s.order[i]] == enc.image_id]
        assert len(image_copy) == enc.n
        if s.ground:  # the recalled frame shows the asked object, so it is among the frames the question is about
            (_, frames, about), = s.ground
            assert set(image_copy) <= set(about)
            grounded += 1
    assert grounded >= 3


def test_a_cache_shaped_step_trains(tmp_path):
    cfg = tv.TrainConfig(size="tiny", max_steps=4, tokens_per_batch=400, max_frames=4, short_frames=2,
                         max_questions=3, lr=5e-3, log_every=2, see_share=0.0, ground_weight=1.0, cache_share=1.0,
                         cache_frames=8, cache_images=24)
    res = tv.train(cfg, None, log=lambda *_: None)
    assert res["steps"] == 4 and all(np.isfinite(h["loss"]) for h in res["history"])

"""The robot VLM trainer: ids equal what the session feeds, loss only on answers, a short run learns and reloads."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from infmllm_ros import world
from infmllm_ros.bench import train_vlm as tv


@pytest.fixture(scope="module")
def tiny():
    model, proc = tv.build("tiny", seed=0)
    return model.eval(), proc, tv.Encoder(model, proc)


def test_frame_ids_and_pixels_match_the_processor(tiny):
    model, proc, enc = tiny
    frame = world.make_episode(2, 1, 0).frames[0]
    out = proc(text=[enc.adapter.frame_text(12.5)], images=[Image.fromarray(frame.rgb)], return_tensors="pt",
               add_special_tokens=False)
    assert out["input_ids"][0].tolist() == enc.frame_ids(12.5)
    assert (np.asarray(enc.frame_ids(12.5)) == enc.image_id).sum() == tv.image_tokens(model) == 16
    torch.testing.assert_close(enc.pixels(frame.rgb), out["pixel_values"][0], atol=1e-5, rtol=0)


def test_labels_cover_the_answers_only(tiny):
    _, proc, enc = tiny
    ep = world.make_episode(11, 10, 5)
    assert len(ep.events) >= 3
    s = enc.sample(ep.frames, ep.events)
    assert len(s.ids) == len(s.labels) and len(s.images) == 10
    picked = [i for i, lab in zip(s.ids, s.labels, strict=True) if lab != -100]
    assert [lab for lab in s.labels if lab != -100] == picked
    want = [t for e in ep.events for t in enc.answer_ids(e.answer)]
    assert picked == want
    text = proc.tokenizer.decode(picked)
    assert text == "".join(e.answer + "</s>" for e in ep.events)
    assert s.ids[0] == proc.tokenizer.bos_token_id


def test_training_ids_equal_what_the_session_feeds(tiny):
    from infmllm_ros.cache import CacheConfig
    from infmllm_ros.engine import StreamingSession

    model, proc, enc = tiny
    ep = world.make_episode(5, 6, 3)
    e = ep.events[-1]
    frames = ep.frames[:e.frame + 1]
    s = StreamingSession(copy.deepcopy(model), proc, cache=CacheConfig(policy="full", budget=2048, max_chunk=256),
                         trace=True, check_memory=False)
    for f in frames:
        s.observe(f.rgb, f.t)
    got = s.ask(e.question, max_new_tokens=1)
    assert s.fed_ids == enc.sample(frames, [e], answers=False).ids
    # and the full-context evaluation path answers what the session answers (full cache, greedy)
    s.reset()
    for f in frames:
        s.observe(f.rgb, f.t)
    got = s.ask(e.question, max_new_tokens=6)
    assert got.text.strip() == tv.answer(model, proc, frames, e.question, enc, max_new_tokens=6)


@pytest.mark.slow
def test_short_training_run_learns_saves_and_reloads(tmp_path):
    cfg = tv.TrainConfig(size="tiny", max_steps=60, tokens_per_batch=500, max_frames=3, short_frames=1,
                         max_questions=2, lr=5e-3, log_every=5, monitor_every=30)
    res = tv.train(cfg, tmp_path / "m", log=lambda *_: None)
    assert res["steps"] == 60
    losses = [h["loss"] for h in res["history"]]
    assert losses[-1] < 0.6 * losses[0], losses
    aux = [h["aux_loss"] for h in res["history"]]  # the per-patch auxiliary loss trains too
    assert aux[-1] < 0.8 * aux[0], aux
    monitored = [h["exact"] for h in res["history"] if "exact" in h]
    assert len(monitored) == 2 and all(0.0 <= v <= 1.0 for m in monitored for v in m.values())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert sum(p.stat().st_size for p in (tmp_path / "m").iterdir()) < 20e6
    fmt = json.loads((tmp_path / "m" / "stream_format.json").read_text())
    assert fmt["image_tokens_per_frame"] == 16 and "move" in fmt["actions"]

    model, proc = tv.load(tmp_path / "m")  # from_pretrained of model and processor
    ref = copy.deepcopy(res["model"]).eval()
    with torch.no_grad():  # the saved weights are the trained ones rounded to fp16 (buffers stay fp32)
        for p in ref.parameters():
            p.copy_(p.half().float())
    enc = tv.Encoder(model, proc)
    ep = world.make_episode(3, 4, 2)
    batch = tv.collate([enc.sample(ep.frames, ep.events)], enc, proc.tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref(**batch).logits)
    # --init continues from the saved weights
    cont = tv.train(tv.TrainConfig(size="tiny", init=str(tmp_path / "m"), max_steps=0))["model"].eval()
    with torch.no_grad():
        assert torch.equal(cont(**batch).logits, ref(**batch).logits)
    # the engine's loader (the session's path) takes it too
    from infmllm_ros.engine import loading

    m2, p2 = loading.load(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(m2(**batch).logits, ref(**batch).logits)
    assert p2.tokenizer.get_vocab() == res["processor"].tokenizer.get_vocab()

    # teacher-forced exact match (the training monitor) == greedy decoding gives the answer's tokens
    agree = []
    for seed in range(12):
        ep = world.make_episode(100 + seed, 3, 1)
        if not ep.events:
            continue
        e = ep.events[0]
        s = enc.sample(ep.frames[:e.frame + 1], [e])
        tf_ok = tv.teacher_forced_exact(model, enc, [s])[e.kind] == 1.0
        ids = torch.tensor([enc.sample(ep.frames[:e.frame + 1], [e], answers=False).ids])
        pixels = torch.stack([enc.pixels(f.rgb) for f in ep.frames[:e.frame + 1]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                 max_new_tokens=40, do_sample=False, eos_token_id=enc.eos, pad_token_id=0)
        want = enc.answer_ids(e.answer)
        agree.append((tf_ok, out[0, ids.shape[1]:ids.shape[1] + len(want)].tolist() == want))
    assert len(agree) >= 8 and all(a == b for a, b in agree), agree
    assert any(a for a, _ in agree)  # "stop" at least is learnt in 60 steps

    ev = tv.evaluate(tmp_path / "m", seeds=[0, 1], n_frames=4, n_questions=3)
    assert ev["n"] >= 4 and set(ev["kinds"]) <= set(world.KINDS)
    for row in ev["kinds"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 < row["majority"] <= 1.0


def test_evaluate_scores_exact_matches(tiny, monkeypatch):
    model, proc, _ = tiny
    seeds = [0, 1, 2]
    truth = {}
    for seed in seeds:
        ep = world.make_episode(seed, 8, 6)
        for e in ep.events:
            truth[(ep.frames[e.frame].rgb.tobytes(), e.question)] = e.answer
    def right(m, p, frames, q, enc):  # true, in other spelling: " A RED BALL. " / spaced-out JSON
        a = truth[(frames[-1].rgb.tobytes(), q)]
        return json.dumps(json.loads(a), indent=1) if a.startswith("{") else f" {a.upper()}. "

    monkeypatch.setattr(tv, "answer", right)
    ev = tv.evaluate(None, seeds, n_frames=8, n_questions=6, model=model, proc=proc)
    assert ev["n"] == sum(len(world.make_episode(s, 8, 6).events) for s in seeds)
    assert all(row["accuracy"] == 1.0 for row in ev["kinds"].values()), ev
    monkeypatch.setattr(tv, "answer", lambda m, p, frames, q, enc: "a red ball")
    ev = tv.evaluate(None, seeds, n_frames=8, n_questions=6, model=model, proc=proc)
    assert ev["kinds"]["action"]["accuracy"] == 0.0
    assert 0.0 < ev["templates"]["action/stop"]["majority"] == 1.0


def _view(name, cx, px, depth=1.5):
    colour, shape = name.split()
    return world.ObjectView(id=0, colour=colour, shape=shape, depth=depth, cx=cx, bbox=(0, 0, 1, 1), visible_px=px,
                            full_px=px)


def test_patch_targets_on_a_constructed_frame():
    labels = np.full((64, 64), -1, np.int8)
    labels[40:64, 0:20] = 0  # red ball: left, near, the biggest; fills patches (2,0), (3,0) and 4 columns of (2/3,1)
    labels[20:30, 36:62] = 1  # blue cube: right (cx 49), far; 12 of 16 rows in patch row 1, 4 in row 0 -> too few
    labels[60:64, 44:48] = 1  # 16 px more in patch (3, 2): exactly AUX_MIN_PX
    views = [_view("red ball", 10.0, 24 * 20), _view("blue cube", 49.0, 10 * 26 + 16, depth=3.0)]
    frame = world.Frame(0, 0.0, np.zeros((64, 64, 3), np.uint8), views, labels=labels)
    got = tv.patch_targets(frame, 16).reshape(4, 4, 5)
    assert (got[..., 4] == 2).all()  # two objects in view, both seen whole
    got = got[..., :4]
    bg, red, blue = len(tv.AUX_NAMES), tv.AUX_NAMES.index("red ball"), tv.AUX_NAMES.index("blue cube")
    assert got[..., 0].tolist() == [[bg, bg, bg, bg], [bg, bg, blue, blue], [red, red, bg, bg], [red, red, blue, bg]]
    assert got[2, 0].tolist() == [red, 0, 1, 1] and got[3, 1].tolist() == [red, 0, 1, 1]  # left, near, biggest
    assert got[1, 3].tolist() == [blue, 2, 0, 0] == got[3, 2].tolist()  # right, far, not the biggest
    assert (got[0, :, 1:] == -100).all()  # background: only "what"
    # an object near a third boundary has no "where" target (its answer would be ambiguous)
    views[1] = _view("blue cube", 64 / 3 * 2 + 1.0, 276, depth=3.0)
    assert tv.patch_targets(frame, 16).reshape(4, 4, 5)[1, 2, 1] == -100
    views[1] = _view("blue cube", 49.0, 276, depth=3.0)
    frame.objects.append(world.ObjectView(id=0, colour="red", shape="cube", depth=3.0, cx=63.5, bbox=(63, 30, 64, 34),
                                          visible_px=4, full_px=200))  # a sliver at the edge: count is ambiguous
    assert (tv.patch_targets(frame, 16)[:, 4] == -100).all()


def test_aux_loss_is_cross_entropy_of_each_head_on_the_projected_tokens(tiny):
    model, proc, enc = tiny
    ep = world.make_episode(4, 3, 2)
    batch = tv.collate([enc.sample(ep.frames, ep.events)], enc, proc.tokenizer.pad_token_id)
    assert batch["patch_targets"].shape == (3, 16, len(tv.AUX_HEADS))
    assert torch.equal(batch["patch_targets"][1], torch.from_numpy(tv.patch_targets(ep.frames[1], 16)))
    head = tv.AuxHead(model.config.text_config.hidden_size)
    feats = torch.randn(3, 16, model.config.text_config.hidden_size)
    logits = head.proj(feats.reshape(48, -1))
    start, want = 0, []
    for i, n in enumerate(tv.AUX_HEADS.values()):  # reference: mean over heads of the mean CE over labelled patches
        t = batch["patch_targets"].reshape(48, -1)[:, i]
        keep = t != -100
        if keep.any():
            want.append(torch.nn.functional.cross_entropy(logits[keep, start:start + n], t[keep]))
        else:
            want.append(torch.tensor(0.0))
        start += n
    torch.testing.assert_close(head(feats, batch["patch_targets"]), torch.stack(want).mean())


def test_grounding_frames_are_the_frames_showing_the_asked_object():
    """Independent of the bench's question parser: the object named in the question, visible in a frame."""
    checked = 0
    for seed in range(40):
        ep = world.make_episode(seed, 8, 6)
        for e in ep.events:
            frames = ep.frames[:e.frame + 1]
            got = tv.grounding_frames(frames, e)
            if e.kind == "current":
                assert got == ([len(frames) - 1] if len(frames) > 1 else [])
            elif e.kind == "action" or "after" not in e.question and "colour" not in e.question and (
                    "where did you last see" not in e.question):
                assert got == []
            else:
                words = e.question.rstrip("?").split()
                name = (words[-3] if "colour" in e.question else " ".join(words[-2:]))  # "the cube you saw"
                want = [k for k, f in enumerate(frames)
                        if any(o.visible and (o.name == name if " " in name else o.shape == name) for o in f.objects)]
                assert got == (want if len(frames) > 1 and len(want) < len(frames) else []), (e.question, got, want)
                checked += bool(got)
    assert checked >= 20


def test_grounding_loss_reads_the_mass_the_evidence_probe_ranks(tiny, monkeypatch):
    """The training loss and the session's evidence see the same attention: a full-cache session's evidence weights
    (no recency correction, every frame listed) equal the per-frame share of the grounding rows' mass in the
    training forward (eager attention on the same ids), and the loss is -log of the asked frames' share."""
    from infmllm_ros.cache import CacheConfig
    from infmllm_ros.engine import StreamingSession, memory_view

    monkeypatch.setattr(memory_view, "RECENCY", 0.0)
    monkeypatch.setattr(memory_view, "TOP_FRAMES", 100)
    model, proc, enc = tiny
    ep = next(ep for ep in (world.make_episode(seed, 6, 4) for seed in range(100))
              if any(e.kind == "past" and tv.grounding_frames(ep.frames[:e.frame + 1], e) for e in ep.events))
    e = next(e for e in ep.events if e.kind == "past" and tv.grounding_frames(ep.frames[:e.frame + 1], e))
    frames = ep.frames[:e.frame + 1]
    s = StreamingSession(copy.deepcopy(model), proc, cache=CacheConfig(policy="full", budget=2048, max_chunk=256),
                         check_memory=False)
    for f in frames:
        s.observe(f.rgb, f.t)
    weights = {w["stamp"]: w["weight"] for w in s.ask(e.question, max_new_tokens=1).evidence["frames"]}
    assert sorted(weights) == [f.t for f in frames]

    sample = enc.sample(frames, [e], answers=False)
    assert len(sample.ground) == 1
    queries, frame_pos, about_pos = sample.ground[0]
    assert queries == list(range(len(sample.ids) - memory_view.EVIDENCE_QUERIES, len(sample.ids)))
    assert [sample.ids[i] for i in frame_pos] == [enc.image_id] * 16 * len(frames)
    batch = tv.collate([sample], enc, proc.tokenizer.pad_token_id, ground=True)
    ground = batch.pop("ground")
    batch.pop("labels")
    batch.pop("patch_targets", None)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attn = eager(**batch, output_attentions=True).attentions
    mass = sum(a[0, :, queries].sum(dim=(0, 1)) for a in attn[len(attn) // 2:])  # [T]
    per_frame = mass[torch.tensor(frame_pos)].reshape(len(frames), 16).sum(-1).double()
    share = per_frame / per_frame.sum()
    torch.testing.assert_close(share, torch.tensor([weights[f.t] for f in frames], dtype=torch.float64),
                               atol=2e-4, rtol=0)
    about = sorted({frame_pos.index(i) // 16 for i in about_pos})
    assert about == tv.grounding_frames(frames, e)
    want = -torch.log(share[about].sum())
    torch.testing.assert_close(tv.grounding_loss(attn, ground).double(), want, atol=1e-3, rtol=1e-3)


def test_grounding_loss_trains_and_the_saved_model_uses_sdpa(tmp_path):
    """Same steps, same data: with the grounding loss on, held-out questions put a larger share of their frame
    attention on the frames they are about than without it."""
    def held_out_grounding(model, proc) -> float:
        enc = tv.Encoder(model, proc)
        samples = [enc.sample(ep.frames, ep.events) for ep in (world.make_episode(900 + k, 4, 3) for k in range(24))]
        batch = tv.collate([x for x in samples if x.ground], enc, proc.tokenizer.pad_token_id, ground=True)
        ground = batch.pop("ground")
        batch.pop("labels")
        batch.pop("patch_targets", None)
        model.set_attn_implementation("eager")
        with torch.no_grad():
            return float(tv.grounding_loss(model(**batch, output_attentions=True).attentions, ground))

    losses = {}
    for weight in (0.0, 1.0):
        cfg = tv.TrainConfig(size="tiny", max_steps=20, tokens_per_batch=300, max_frames=4, short_frames=2,
                             max_questions=3, lr=5e-3, log_every=5, see_share=0.0, ground_weight=weight)
        res = tv.train(cfg, tmp_path / str(weight), log=lambda *_: None)
        assert ("ground_loss" in res["history"][-1]) == bool(weight)
        assert res["model"].config._attn_implementation == "sdpa"  # eager only while training
        assert tv.load(tmp_path / str(weight))[0].config._attn_implementation == "sdpa"
        losses[weight] = held_out_grounding(res["model"], res["processor"])
    assert losses[1.0] < 0.92 * losses[0.0], losses  # 0.89 vs 1.01 here

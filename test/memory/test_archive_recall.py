"""Recall through the session (memory/recall.py): recalled K/V are what was archived (quantization bound), an answer
with recall equals a plain forward over [held + recalled + question] given the same K/V (fp32), archive bytes stay
under archive_mb over a 2,000-frame stream, and recall that brings nothing back changes no output."""

import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from engine_helpers import frame, get_tiny, make_session  # noqa: E402

from infmllm_ros.cache import CacheConfig  # noqa: E402

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _text_model(model):
    for m in model.modules():  # the decoder stack: layers + rotary embedding (as attention.install finds it)
        if hasattr(m, "layers") and hasattr(m, "rotary_emb"):
            return m
    raise AssertionError("no text model")


def _rotate_fp64(k: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Reference RoPE turn of keys [..., n, D] by `delta` positions (rotate_half layout), in fp64."""
    f = inv_freq.numel()
    ang = delta * inv_freq.double()
    cos, sin = ang.cos(), ang.sin()
    x = k.double()
    x1, x2 = x[..., :f], x[..., f:2 * f]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * f:]], -1).float()


class Spy:
    """Records what the session archived (the cache's K/V before quantization) and the state right after a recall."""

    def __init__(self, session):
        self.session, self.originals, self.recalls = session, {}, []
        recall = session.recall
        archive_frame, before_question = recall.archive_frame, recall.before_question

        def spy_archive(cache, n, stamp):
            fid = cache.seen - n
            self.originals[fid] = (cache.keys[:, :, cache.stored - n:cache.stored].clone(),
                                   cache.values[:, :, cache.stored - n:cache.stored].clone(),
                                   cache.pos[0, 0, cache.stored - n:cache.stored].clone())
            return archive_frame(cache, n, stamp)

        def spy_question(session_, chunk, q_tokens):
            cache = session_.cache
            held = cache.stored
            picked = []
            choose = recall.choose
            recall.choose = lambda c, queries, qpos: picked.extend(choose(c, queries, qpos)) or list(picked)
            try:
                tokens = before_question(session_, chunk, q_tokens)
            finally:
                recall.choose = choose
            c = cache  # the state the question's prefill starts from
            self.recalls.append(dict(
                held=held, tokens=tokens, picked=sorted(picked), ids=chunk.ids.clone(),
                keys=c.keys[:, :, :c.stored].clone(), values=c.values[:, :, :c.stored].clone(),
                pos=c.pos[:, :, :c.stored].clone(), offset=c.offset[:, :, :c.stored].clone(),
                next_position=c.next_position, stored=c.stored))
            return tokens

        recall.archive_frame, recall.before_question = spy_archive, spy_question


def _stream(family, recall_frames, budget=40, frames=8, positions="absolute", **kw):
    model, proc = get_tiny(family)
    cfg = CacheConfig(policy="saddle", budget=budget, recent=8, max_chunk=256, max_new_tokens=6, positions=positions)
    s = make_session(model, proc, cfg, recall_frames=recall_frames, **kw)
    spy = Spy(s) if recall_frames else None
    for i in range(frames):
        s.observe(frame(i), 50.0 + i)
    a = s.ask("What did you see first?", max_new_tokens=5, output_logits=True)
    return model, s, spy, a


@pytest.mark.parametrize("family,placement", [("llava_llama", "question"), ("llava_llama", "past"),
                                               ("qwen2_vl", "question"), ("qwen2_vl", "past")])
def test_recalled_kv_is_the_archived_kv_and_answer_matches_plain_forward(family, placement, tmp_path):
    model, s, spy, a = _stream(family, recall_frames=2, archive_dir=str(tmp_path), recall_placement=placement)
    assert s.archive is not None and len(s.archive.frames) == 8
    (rec,) = spy.recalls
    assert rec["tokens"] > 0 and rec["picked"], "nothing was recalled: the test would prove nothing"
    held = rec["stored"] - rec["tokens"]
    assert held <= s.cfg.budget  # the stream was evicted to the budget before the question
    inv_freq = _text_model(model).rotary_emb.inv_freq
    slot = held
    rec_keys, rec_vals = [], []
    spans = sum(int(spy.originals[f][2].max() - spy.originals[f][2].min() + 1) for f in rec["picked"])
    # "question": right after the held positions (next_position moved past them); "past": right before the oldest held
    end = rec["next_position"] if placement == "question" else int(rec["pos"][:, :, :held].min())
    start = end - spans
    for fid in rec["picked"]:
        k0, v0, p0 = spy.originals[fid]
        n = k0.shape[2]
        sl = slice(slot, slot + n)
        # 1. the recalled slots hold the archive's dequantized K/V, which are within scale / 2 of the originals
        gk, gv, gp = s.archive.get(fid)
        assert torch.equal(rec["keys"][:, :, sl], gk) and torch.equal(rec["values"][:, :, sl], gv)
        for got, ref in ((gk, k0), (gv, v0)):
            bound = ref.abs().amax(dim=2, keepdim=True) / 127 * (1 + 2e-3) / 2 + 1e-7  # fp16 scale step up
            assert bool(((got - ref).abs() <= bound).all())
        # positions: the frame moved as a whole (every M-RoPE row by the same delta) to just after the held tokens
        delta = start - int(p0.min())
        assert torch.equal(gp, p0)
        assert torch.equal(rec["pos"][:, :, sl], (p0 + delta).expand_as(rec["pos"][:, :, sl]))
        off = rec["offset"][:, :, sl]
        assert bool((off == delta).all())
        rec_keys.append(_rotate_fp64(gk, delta, inv_freq))  # the key as the model would rotate it at p0 + delta
        rec_vals.append(gv)
        start += int(p0.max() - p0.min() + 1)
        slot += n
    assert start == end
    # held tokens (positions "absolute": never turned) as stored
    assert bool((rec["offset"][:, :, :held] == 0).all())

    # 2. oracle: a plain forward over [held + recalled] K/V (DynamicCache) + the question, at the positions used
    dc = DynamicCache()
    for layer in range(rec["keys"].shape[0]):
        k = torch.cat([rec["keys"][layer, :, :held]] + [r[layer] for r in rec_keys], 1)[None]
        v = torch.cat([rec["values"][layer, :, :held]] + [r[layer] for r in rec_vals], 1)[None]
        dc.update(k, v, layer)
    ids = rec["ids"]
    q = ids.shape[1]
    p = rec["next_position"]
    steps = [ids] + [torch.tensor([[t]]) for t in a.tokens[:-1]]
    want = []
    with torch.no_grad():
        for x in steps:
            pos = (p + torch.arange(x.shape[1]))[None]
            if family.startswith("qwen2"):
                pos = pos[None].expand(3, 1, -1)
            want.append(model(input_ids=x, position_ids=pos, cache=dc, use_cache=True).logits[0, -1].float())
            p += x.shape[1]
    want = torch.stack(want)
    assert a.logits.shape == want.shape and q > 0
    assert (a.logits - want).abs().max().item() < ATOL
    # 3. released: the cache is back to the budget, nothing recalled is left in it
    assert s.cache.stored <= s.cfg.budget and s.recall.active is None


def test_recall_that_brings_nothing_back_changes_no_output(tmp_path):
    """Budget holds every frame: each frame is held, none is recalled; the probe forward is rolled back, so the
    logits equal a session without recall (same seed), question after question."""
    outs = []
    for recall_frames in (0, 2):
        model, proc = get_tiny("llava_llama")
        cfg = CacheConfig(policy="saddle", budget=1024, recent=8, max_chunk=256, max_new_tokens=6)
        s = make_session(model, proc, cfg, recall_frames=recall_frames, archive_dir=str(tmp_path))
        logits = []
        for i in range(4):
            s.observe(frame(i), 10.0 + i)
            logits.append(s.ask(f"Question {i}?", max_new_tokens=4, output_logits=True).logits)
        outs.append(torch.cat(logits))
        if recall_frames:
            assert s.recall.recalls == 0 and len(s.archive.frames) == 4
    assert torch.equal(outs[0], outs[1])


def test_recall_off_by_default_no_archive(tmp_path):
    model, proc = get_tiny("llava_llama")
    s = make_session(model, proc, CacheConfig(budget=64, recent=8, max_new_tokens=4))
    assert s.archive is None and s.recall is None and s.cache_cfg.recall_slots == 0
    assert s.stats()["recall"] is None


def test_reserved_slots_are_in_the_capacity_and_kv_bytes(tmp_path):
    model, proc = get_tiny("llava_llama")
    cfg = CacheConfig(budget=64, recent=8, max_new_tokens=4)
    off = make_session(model, proc, cfg)
    on = make_session(model, proc, cfg, recall_frames=3, archive_dir=str(tmp_path))
    slots = on.cache_cfg.recall_slots
    assert slots >= 3 * on.max_frame_tokens
    assert on.cache_cfg.capacity == off.cache_cfg.capacity + slots
    assert on.kv_bytes == off.kv_bytes * on.cache_cfg.capacity // off.cache_cfg.capacity
    assert on.stats()["kv_bytes"] == on.kv_bytes


def test_archive_bytes_bounded_over_2000_frames_and_answers_keep_coming(tmp_path):
    model, proc = get_tiny("llava_llama")
    cfg = CacheConfig(policy="saddle", budget=48, recent=8, max_chunk=256, max_new_tokens=4)
    archive_mb = 0.05  # ~12 frames of the tiny model: the archive thins all the time
    s = make_session(model, proc, cfg, recall_frames=2, archive_mb=archive_mb, archive_dir=str(tmp_path))
    limit = int(archive_mb * 2**20)
    img = frame(0, 8, 8)
    for i in range(2000):
        s.observe(img, float(i))
        on_disk = sum(os.path.getsize(os.path.join(tmp_path, f)) for f in os.listdir(tmp_path))
        assert on_disk <= limit and s.archive.used_bytes <= limit
        if i % 500 == 499:
            a = s.ask("What did you see?", max_new_tokens=3)
            assert a.tokens and s.cache.stored <= cfg.budget
    st = s.archive.stats()
    assert st["dropped"] > 1900 and st["frames"] >= 5
    stamps = sorted(e.stamp for e in s.archive.frames.values())
    assert stamps[0] == 0.0 and stamps[-1] == 1999.0  # thinned evenly: the far past stays represented
    assert s.recall.recalls >= 1
    assert s.cache.next_position <= s.cache_cfg.capacity  # positions stay bounded with recall (reindex)


def test_reset_clears_the_archive(tmp_path):
    _, s, _, _ = _stream("llava_llama", recall_frames=1, archive_dir=str(tmp_path), frames=3)
    assert len(s.archive.frames) == 3 and os.listdir(tmp_path)
    s.reset()
    assert len(s.archive.frames) == 0 and not [f for f in os.listdir(tmp_path) if f.endswith(".kvp")]


def test_node_parameters_reach_the_session(tmp_path, monkeypatch):
    from infmllm_ros.ros.parameters import PARAMS
    from infmllm_ros.ros.session_factory import recall_kwargs

    assert recall_kwargs(dict(PARAMS)) == {}  # the defaults: recall off
    monkeypatch.setenv("ROS_HOME", str(tmp_path))
    got = recall_kwargs({**PARAMS, "memory.recall_frames": 2, "memory.archive_mb": 8.0})
    assert got == dict(recall_frames=2, archive_mb=8.0, archive_dir=str(tmp_path / "infmllm_ros" / "archive"),
                       recall_placement="past")
    model, proc = get_tiny("llava_llama")
    s = make_session(model, proc, CacheConfig(budget=64, recent=8, max_new_tokens=4), **got)
    assert s.archive is not None and os.path.isdir(got["archive_dir"]) and s.archive.max_bytes == 8 * 2**20


@pytest.mark.parametrize("family", ["llava_llama", "qwen2_vl"])
def test_probe_with_an_inserted_frame_matches_the_real_recall_and_rolls_back(family, tmp_path):
    """probe_forward (the machinery a re-ranking would run once per candidate frame): with archived frame F inserted,
    its first-token logits equal the session's real answer when recall picks F (oracle: the session's own recall
    path + prefill), and it leaves every stored slot and the cache's state bit-identical, also after decode steps."""
    from infmllm_ros.memory import recall as recall_mod

    model, proc = get_tiny(family)
    cfg = CacheConfig(policy="saddle", budget=40, recent=8, max_chunk=256, max_new_tokens=6, positions="absolute")
    s = make_session(model, proc, cfg, recall_frames=1, archive_dir=str(tmp_path))
    for i in range(8):
        s.observe(frame(i), 50.0 + i)
    recall, seen = s.recall, {}
    before_question = recall.before_question

    def probing(session, chunk, q_tokens):
        c = session.cache
        ids = list(recall.archive.frames)
        held = recall.held_fraction(c, ids)
        target = next(f for f, h in zip(ids, held.tolist(), strict=True) if h < recall_mod.HELD_FRACTION)
        state = lambda: ([(la.stored, la.seen, la.scored) for la in c.layers], c.next_position, c.chunks,  # noqa: E731
                         c.decoded, c.prefill, c.turned,
                         [getattr(c, t)[:, :, :c.stored].clone() for t in recall_mod.SLOT_TENSORS])
        before = state()
        _q, _p, logits = recall_mod.probe_forward(session, chunk, q_tokens, frames=[recall.archive.get(target)],
                                                  steps=3)
        after = state()
        assert after[:6] == before[:6]
        assert all(torch.equal(x, y) for x, y in zip(after[6], before[6], strict=True))
        seen.update(target=target, logits=logits)
        recall.choose = lambda *_a: [target]
        return before_question(session, chunk, q_tokens)

    recall.before_question = probing
    a = s.ask("What did you see first?", max_new_tokens=3, output_logits=True)
    assert s.recall.last["frames"] == 1, "nothing was recalled: the test would prove nothing"
    assert seen["logits"].shape == (3, a.logits.shape[-1])
    assert (seen["logits"][0] - a.logits[0]).abs().max().item() < ATOL


def test_caption_ranking_picks_the_most_recent_matching_frame_not_held(tmp_path):
    """Ranking by construction: captions set by hand (the tiny random model's own captions are noise); the question
    names "red cube": of the frames not held, the newest whose caption shares the most words with it is picked,
    never a held one, never the newer frame with a different object."""
    from infmllm_ros.engine.adapters import Chunk
    from infmllm_ros.memory import recall as recall_mod

    model, proc = get_tiny("llava_llama")
    cfg = CacheConfig(policy="saddle", budget=40, recent=8, max_chunk=256, max_new_tokens=6)
    s = make_session(model, proc, cfg, recall_frames=1, archive_dir=str(tmp_path))
    for i in range(8):
        s.observe(frame(i), 50.0 + i)
    rec = s.recall
    ids = list(rec.archive.frames)
    held = rec.held_fraction(s.cache, ids).tolist()
    free = [f for f, h in zip(ids, held, strict=True) if h < recall_mod.HELD_FRACTION]
    held_ids = [f for f, h in zip(ids, held, strict=True) if h >= recall_mod.HELD_FRACTION]
    assert len(free) >= 4 and held_ids, "the stream must leave frames held and frames out of the cache"
    captions = {f: "a blue ball" for f in ids}
    captions[free[0]] = captions[free[2]] = "a red cube"  # the answer: free[2] (newer than free[0])
    captions[free[1]] = "a red ball"  # one word shared only
    captions[free[3]] = "a green cone"  # newest free frame, other object
    for f in held_ids:
        captions[f] = "a red cube"  # held: in view already, never recalled
    rec.captions = {f: recall_mod._words(t) for f, t in captions.items()}
    q = s.adapter.encode_user("where did you last see the red cube?")
    chunk = Chunk(ids=torch.tensor([q]), mm_token_type_ids=torch.zeros(1, len(q), dtype=torch.long))
    n_layers, heads, _cap, d = s.cache.keys.shape
    queries, positions = torch.randn(n_layers, 3 * heads, len(q), d), torch.arange(len(q))
    rec._question = (s, chunk, len(q))
    assert rec.choose(s.cache, queries, positions) == [free[2]]
    captions[free[2]] = "a blue cube"
    rec.captions = {f: recall_mod._words(t) for f, t in captions.items()}
    assert rec.choose(s.cache, queries, positions) == [free[0]]

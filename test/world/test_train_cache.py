"""Training over the real bounded cache: the trained forward sees exactly what the session's question sees."""

import numpy as np
import pytest
import torch

from infmllm_ros import world
from infmllm_ros.bench import train_cache as tc
from infmllm_ros.bench import train_vlm as tv


@pytest.fixture(scope="module")
def tiny():
    model, proc = tv.build("tiny", seed=0)
    return model.eval(), proc, tv.Encoder(model, proc)


def _stream(streams, enc, seed, n_frames, budget_index=0):
    """Stream one episode through a session of `streams`: (episode, event, example, Answer with logits) per question."""
    session = streams.sessions[budget_index]
    ep = world.make_episode(seed, n_frames, 10)
    rows = tc.stream(session, ep, enc, 4, streams.asked, output_logits=True)
    events = [e for f in ep.frames for e in ep.events if e.frame == f.index][:len(rows)]
    return [(ep, e, ex, answer) for e, (ex, answer) in zip(events, rows, strict=True)]


def _logits(model, ex):
    from transformers import DynamicCache

    past = DynamicCache(config=model.config.text_config)
    for i, (k, v) in enumerate(zip(ex.keys, ex.values, strict=True)):
        past.update(k, v, i)
    ids = torch.tensor([ex.ids])
    with torch.no_grad():
        return model(input_ids=ids, position_ids=ex.start + torch.arange(ids.shape[1])[None], cache=past).logits[0]


def test_the_trained_forward_over_the_read_cache_gives_the_sessions_logits(tiny):
    """Oracle: the session's own question prefill (bounded saddle cache, evicting and re-indexing every chunk).
    The trained model's forward over the example (a DynamicCache of the read K/V, the question at the session's
    positions) predicts the first answer token with the same logits, after many evictions."""
    model, proc, enc = tiny
    streams = tc.CacheStreams(model, proc, budgets=(40,), frames=(16, 16))
    rows = _stream(streams, enc, 3, 16)
    assert streams.sessions[0].cache.evictions > 10
    checked = 0
    for _, _, ex, answer in rows:
        assert ex is not None
        assert len(ex.keys) == model.config.text_config.num_hidden_layers
        assert ex.keys[0].shape[-2] <= 40 + 4  # the budget + the last answer's tokens fed while decoding
        torch.testing.assert_close(_logits(model, ex)[ex.queries[-1]], answer.logits[0], atol=1e-5, rtol=0)
        checked += 1
    assert checked >= 5


def test_with_recall_the_example_holds_the_recalled_frame_and_gives_the_sessions_logits(tiny):
    """Recall on (oracle ranking, "past" placement): a question whose evidence frame left the cache reads it back;
    the example then holds that frame's slots, and the trained forward over it still gives the session's logits."""
    model, proc, enc = tiny
    streams = tc.CacheStreams(model, proc, budgets=(40,), frames=(24, 24), recall=True)
    session, lasts = streams.sessions[0], []
    ask = session.ask

    def asking(*args, **kwargs):  # the recall of each question, read right after it
        answer = ask(*args, **kwargs)
        lasts.append(session.stats()["recall"]["last_recall"])
        return answer

    session.ask = asking
    recalled = 0
    for seed in range(4):
        lasts.clear()
        for (ep, e, ex, answer), last in zip(_stream(streams, enc, seed, 24), lasts, strict=True):
            torch.testing.assert_close(_logits(model, ex)[ex.queries[-1]], answer.logits[0], atol=1e-5, rtol=0)
            if last["frames"]:
                assert last["stamps"] == [tc.STAMP0 + ep.frames[e.seen_frame].t]
                assert ex.keys[0].shape[-2] > 40 + 4  # held + the recalled frame's slots
                recalled += 1
    assert recalled >= 3


def test_grounding_loss_is_minus_log_of_the_evidence_share_of_the_asked_frames(tiny, monkeypatch):
    """The cache example's grounding loss reads what `Answer.evidence` ranks by: with no recency correction and
    every frame listed, -log(sum of the evidence weights of the frames the question is about)."""
    from infmllm_ros.engine import memory_view

    monkeypatch.setattr(memory_view, "RECENCY", 0.0)
    monkeypatch.setattr(memory_view, "TOP_FRAMES", 1000)
    model, proc, enc = tiny
    eager = tv.build("tiny", seed=0)[0].eval()
    eager.set_attn_implementation("eager")
    streams = tc.CacheStreams(model, proc, budgets=(60,), frames=(12, 12))
    checked = 0
    for seed in range(6):
        for ep, e, ex, answer in _stream(streams, enc, seed, 12):
            if ex is None or ex.about is None:
                continue
            index_of = {tc.STAMP0 + f.t: f.index for f in ep.frames}
            weights = {index_of[w["stamp"]]: w["weight"] for w in answer.evidence["frames"]}
            about = tc.grounded(ep, sorted(weights), e.frame, e)
            assert about and set(about) < set(weights)
            _, ground = tc.example_loss(eager, ex, ground=True)
            want = -np.log(sum(weights[i] for i in about))
            assert ground.item() == pytest.approx(want, abs=2e-3)
            checked += 1
    assert checked >= 8


def test_grounded_frames():
    ep = world.make_episode(4, 30, 0)
    past = world.Event(frame=29, t=ep.frames[29].t, kind="past", template="colour_past",
                       question="what colour was the cube you saw?", answer="red", distance=3, seen_frame=26)
    held = list(range(10, 30))
    about = tc.grounded(ep, held, 29, past)
    assert about == [i for i in held if any(o.shape == "cube" for o in ep.frames[i].seen())]
    current = world.Event(frame=29, t=0.0, kind="current", template="count", question="how many objects do you see?",
                          answer="one", distance=0, seen_frame=29)
    assert tc.grounded(ep, held, 29, current) == [29]
    assert tc.grounded(ep, [29], 29, current) == []  # one frame grounds nothing


def test_a_cache_trained_run_steps_on_both_kinds_and_lowers_the_cache_loss(tmp_path):
    """Cache-trained steps run beside the usual ones and are counted; on a fixed set of cache examples the answer
    loss after training is lower than before (the same examples, read once from the untrained model's cache)."""
    model, proc = tv.build("tiny", seed=0)
    enc = tv.Encoder(model, proc)
    fixed = tc.CacheStreams(model, proc, budgets=(48,), frames=(10, 10), questions=8)
    examples = [ex for k in range(3) for ex in fixed.examples(np.random.default_rng(k), enc, 123)]
    assert len(examples) >= 10

    def mean_loss(m):
        with torch.no_grad():
            return float(np.mean([tc.example_loss(m, ex, ground=False)[0].item() for ex in examples]))

    before = mean_loss(model.eval())
    cfg = tv.TrainConfig(size="tiny", max_steps=30, tokens_per_batch=400, max_frames=4, short_frames=2,
                         max_questions=3, lr=5e-3, log_every=10, see_share=0.0, ground_weight=1.0, cache_train=0.5,
                         cache_frames=(10, 14))
    res = tv.train(cfg, tmp_path / "m", log=lambda *_: None)
    assert 5 <= res["cache_steps"] <= 25 and res["steps"] == 30
    assert "cache_loss" in res["history"][-1] and "cache_ground_loss" in res["history"][-1]
    assert res["model"].config._attn_implementation == "sdpa"
    assert mean_loss(res["model"]) < 0.7 * before, (before, mean_loss(res["model"]))

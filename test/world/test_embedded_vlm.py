"""The committed embedded robot VLM (infmllm_ros/assets/robot_vlm) really sees: a fixed small held-out check.

It runs the node's own path (config/robot.yaml's parameters -> session_factory.make_session -> StreamingSession with
the bounded saddle cache) on held-out world episodes and scores the answers against the world's ground truth. The
thresholds sit below what `infmllm-bench train-vlm --eval-only` measured on 200 held-out episodes (docs/world.md)
and far above chance (always the most common answer of each question), so a broken load, a wrong stream format or an
untrained checkpoint fails.
"""

from collections import Counter
from pathlib import Path

import pytest

from infmllm_ros import world
from infmllm_ros.bench import train_vlm as tv
from infmllm_ros.ros import params, session_factory

ROOT = Path(__file__).resolve().parents[2]
SEEDS = range(7000, 7060)  # held out: training draws seeds >= tv.TRAIN_SEED_BASE
CURRENT_MIN = 0.75  # measured here: 0.900 (n=120, chance 0.292); train-vlm evaluation: 0.917 on 400
PAST_MIN = 0.45  # measured here: 0.625 (n=112, chance 0.348); train-vlm evaluation: 0.630 on 362


@pytest.fixture(scope="module")
def answers():
    assert max(SEEDS) < min(tv.TRAIN_SEED_BASE, tv.MONITOR_SEED_BASE)  # never trained on, never monitored
    assert (Path(session_factory.embedded_model()) / "config.json").is_file()
    p = params.flatten(params.node_parameters(str(ROOT / "config" / "robot.yaml"), "infmllm_node"))
    assert p["model"] == ""  # the default is the embedded model
    session = session_factory.make_session(p)
    out = []
    for seed in SEEDS:
        ep = world.make_episode(seed, 12, 6)  # as train-vlm's evaluation, other seeds
        session.reset()
        asked = 0
        for e in ep.events:
            while asked <= e.frame:
                session.observe(ep.frames[asked].rgb, ep.frames[asked].t)
                asked += 1
            got = session.ask(e.question, max_new_tokens=48).text
            out.append((e, world.normalize_answer(got) == world.normalize_answer(e.answer)))
    return out


def _accuracy(rows, kind):
    hits = [ok for e, ok in rows if e.kind == kind]
    return sum(hits) / len(hits), len(hits)


def _majority(rows, kind):
    by_template = {}
    for e, _ in rows:
        by_template.setdefault(e.template, Counter())[world.normalize_answer(e.answer)] += 1
    hits = [by_template[e.template].most_common(1)[0][0] == world.normalize_answer(e.answer)
            for e, _ in rows if e.kind == kind]
    return sum(hits) / len(hits)


def test_embedded_model_answers_current_view_questions(answers):
    acc, n = _accuracy(answers, "current")
    print(f"current {acc:.3f} (n={n}, majority {_majority(answers, 'current'):.3f})")
    assert n >= 100
    assert acc >= CURRENT_MIN and acc >= _majority(answers, "current") + 0.4, (acc, n)


def test_embedded_model_recalls_what_it_saw(answers):
    acc, n = _accuracy(answers, "past")
    print(f"past {acc:.3f} (n={n}, majority {_majority(answers, 'past'):.3f})")
    assert n >= 100
    assert acc >= PAST_MIN and acc >= _majority(answers, "past") + 0.12, (acc, n)

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
SEEDS = range(7000, 7024)  # held out: training draws seeds >= tv.TRAIN_SEED_BASE
CURRENT_MIN = 0.80
PAST_MIN = 0.45


@pytest.fixture(scope="module")
def answers():
    assert (Path(session_factory.embedded_model()) / "config.json").is_file()
    p = params.flatten(params.node_parameters(str(ROOT / "config" / "robot.yaml"), "infmllm_node"))
    assert p["model"] == ""  # the default is the embedded model
    session = session_factory.make_session(p)
    out = []
    for seed in SEEDS:
        ep = world.make_episode(seed, 8, 6, kinds=("current", "past"))
        session.reset()
        asked = 0
        for e in ep.events:
            while asked <= e.frame:
                session.observe(ep.frames[asked].rgb, ep.frames[asked].t)
                asked += 1
            got = session.ask(e.question, max_new_tokens=12).text
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
    assert n >= 40
    assert acc >= CURRENT_MIN and acc >= _majority(answers, "current") + 0.3, (acc, n)


def test_embedded_model_recalls_what_it_saw(answers):
    acc, n = _accuracy(answers, "past")
    assert n >= 30
    assert acc >= PAST_MIN and acc >= _majority(answers, "past") + 0.1, (acc, n)

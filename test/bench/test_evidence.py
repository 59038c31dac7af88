"""infmllm-bench evidence: the asked-object predicate against the world's own records, and the harness on a tiny
random-weight VLM (hit rates are meaningless there; the chance level is recomputed by hand from the rows)."""

import json

import pytest
import torch

from infmllm_ros import world
from infmllm_ros.bench import common, evidence, report


def test_asked_object_matches_the_answer_frame():
    """Every past question of several episodes parses, and its answer frame shows the object it names."""
    n = 0
    for seed in range(4):
        ep = world.make_episode(seed, 64, 20, kinds=("past",))
        for e in ep.events:
            pred = evidence.asked_object(e.question)
            assert evidence.shows(ep.frames[e.seen_frame], pred), e
            assert not any(pred(o) for o in ep.frames[e.frame].objects if o.visible) or e.template == "after"
            n += 1
    assert n >= 40
    with pytest.raises(ValueError):
        evidence.asked_object("what is in front of you?")


def test_tiny_run_chance_and_report(tmp_path):
    from infmllm_ros.engine.tiny import tiny_model

    torch.set_num_threads(1)
    model, proc = tiny_model("llava_llama")
    args = ["--seeds", "0", "--frames", "20", "--questions", "4", "--current-questions", "3", "--budgets", "96",
            "--max-new-tokens", "2", "--out", str(tmp_path), "--note", "A hand-written note."]
    assert evidence.main(args, model=model, processor=proc) == 0
    res = json.loads((tmp_path / "evidence.json").read_text())
    cell = res["budgets"]["96"]
    past = [r for r in cell["rows"] if r["kind"] == "past"]
    cur = [r for r in cell["rows"] if r["kind"] == "current"]
    assert cell["questions"] == len(past) >= 1 and cell["current_n"] == len(cur) >= 1
    eps = world.make_episode(0, 20, 4, kinds=("past",))
    for r in past:
        pred = evidence.asked_object(r["question"])
        shown = sum(evidence.shows(eps.frames[i], pred) for i in r["held"])
        assert r["chance"] == pytest.approx(shown / len(r["held"]))
        assert r["answer_frame_held"] == (r["seen_frame"] in r["held"])
        if r["top"] is not None:
            assert r["top"] in r["held"] and r["hit"] == evidence.shows(eps.frames[r["top"]], pred)
    held = [r for r in past if r["answer_frame_held"]]
    assert cell["n"] == len(held)
    if held:
        assert cell["chance"] == pytest.approx(sum(r["chance"] for r in held) / len(held), abs=1e-4)
    cur_eps = world.make_episode(0, 20, 3, kinds=("current",))
    assert [r["question"] for r in cur] == [e.question for e in cur_eps.events]
    for r in cur:
        assert r["top_is_newest"] == (r["top"] == r["frame"])
    assert cell["current_chance"] == pytest.approx(sum(1 / len(r["held"]) for r in cur) / len(cur), abs=1e-4)
    assert cell["current_top_is_newest"] == pytest.approx(sum(r["top_is_newest"] for r in cur) / len(cur), abs=1e-4)
    md = report.render(report.load_results(tmp_path), tmp_path / "BENCHMARKS.md")
    assert "## Answer evidence (evidence.json)" in md and "A hand-written note." in md
    assert "--note" not in res["command"] and "--current-questions 3" in res["command"]


def test_wilson_interval_and_the_clear_majority_line():
    # published values (Wilson 1927 score interval, z = 1.96): 7/10 -> 0.3968-0.8922, 0/10 -> 0-0.2775
    assert common.wilson(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    assert common.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    # a bare majority of 215 questions is not a clear one; 62 % of them is
    bare = {"hit_rate": 115 / 215, "n": 215, "hit_rate_per_token": 0.5, "chance": 0.3, "top_is_newest": 0.0}
    clear = {**bare, "hit_rate": 134 / 215}
    assert not evidence.clear_majority(bare) and evidence.clear_majority(clear)
    lines = evidence.findings("evidence", {"budgets": {"128": bare, "512": clear}})
    assert lines[0].endswith("not met.") and lines[1].endswith(" met.")

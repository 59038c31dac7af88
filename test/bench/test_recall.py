"""infmllm-bench recall: the harness on a tiny random-weight VLM (accuracy is meaningless there) and on scripted
sessions injected through `session_factory` (an oracle that answers the truth, one that answers garbage)."""

import hashlib
import json
import shutil
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from infmllm_ros import world
from infmllm_ros.bench import recall, report

SEEDS, FRAMES, QUESTIONS, BUDGET, NEW = (0, 1), 16, 6, 48, 3
ARGS = ["--seeds", *map(str, SEEDS), "--frames", str(FRAMES), "--questions", str(QUESTIONS), "--budget", str(BUDGET),
        "--max-new-tokens", str(NEW), "--threads", "1"]
POLICIES = {"full", "window_no_sinks", "streaming_llm", "h2o", "saddle[none,0]", "saddle[linear,0.5]",
            "saddle[linear,1]", "saddle[linear,2]", "saddle[age_decay,0.1]", "saddle[age_decay,0.5]"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The benchmark through real StreamingSessions on the tiny random LLaVA-Llama: (results, out dir)."""
    from infmllm_ros.engine.tiny import tiny_model

    torch.set_num_threads(1)
    model, proc = tiny_model("llava_llama")
    out = tmp_path_factory.mktemp("recall")
    assert recall.main([*ARGS, "--out", str(out)], model=model, processor=proc) == 0
    return json.loads((out / "recall.json").read_text()), out


def test_bucket_edges():
    got = [recall.bucket(d) for d in (0, 1, 4, 5, 16, 17, 64, 65, 500, None)]
    assert got == ["0", "1-4", "1-4", "5-16", "5-16", "17-64", "17-64", "65+", "65+", "none"]


def test_json_has_every_policy_and_bucket_and_counts_add_up(tiny_run):
    res, out = tiny_run
    n = sum(len(world.make_episode(s, FRAMES, QUESTIONS).events) for s in SEEDS)
    assert n > 0 and res["n_questions"] == n and res["kind"] == "recall"
    assert set(res["policies"]) == POLICIES
    for name, e in res["policies"].items():
        assert "skipped" not in e, e
        assert list(e["by_bucket"]) == recall.BUCKET_NAMES == res["buckets"]
        assert sum(c["n"] for c in e["by_bucket"].values()) == n
        assert sum(c["n"] for c in e["by_kind"].values()) == n
        assert sum(c["n"] for k in world.KINDS for c in e["by_kind_bucket"][k].values()) == n
        assert e["overall"]["n"] == n == len([r for r in res["records"] if r["policy"] == name])
    assert res["machine"]["cores"] and res["command"].startswith("infmllm-bench recall")
    assert (out / "recall.png").stat().st_size > 0 and "| policy | all | 0 | 1-4 |" in (out / "recall.md").read_text()


def test_records_carry_the_world_distances(tiny_run):
    """Oracle: the events recomputed from make_episode, in stream order, for every policy."""
    res, _ = tiny_run
    events = [(s, e) for s in SEEDS for e in world.make_episode(s, FRAMES, QUESTIONS).events]
    assert any(e.distance not in (0, None) for _, e in events)  # the check below can tell distances apart
    for name in POLICIES:
        recs = [r for r in res["records"] if r["policy"] == name]
        assert [(r["seed"], r["frame"], r["question"], r["truth"], r["kind"], r["distance"]) for r in recs] == \
            [(s, e.frame, e.question, e.answer, e.kind, e.distance) for s, e in events]
        assert all(r["bucket"] == recall.bucket(r["distance"]) for r in recs)


def test_budgets_are_honoured(tiny_run):
    res, _ = tiny_run
    for name, e in res["policies"].items():
        recs = [r for r in res["records"] if r["policy"] == name]
        if name == "full":
            assert all(r["stored"] == r["seen"] for r in recs)  # never evicts
            continue
        assert e["budget"] == BUDGET and e["capacity"] == BUDGET + e["max_chunk"] + NEW
        assert max(r["seen"] for r in recs) > 3 * BUDGET  # the budget binds
        assert e["max_stored_after_frame"] <= BUDGET
        # after the question chunk's eviction only decoded tokens are added (the last one is fed later)
        assert all(r["stored"] <= BUDGET + NEW - 1 <= e["capacity"] for r in recs), [r["stored"] for r in recs]


def _key(rgb) -> str:
    return hashlib.sha1(rgb.tobytes()).hexdigest()


class Scripted:
    """A session that answers from a script keyed by (episode, frames seen, question); counts like the real one."""

    def __init__(self, answers):
        self.answers = answers

    def reset(self):
        self.episode, self.frames, self.used = None, 0, defaultdict(int)

    def observe(self, frame, stamp):
        self.episode = self.episode or _key(frame)
        self.frames += 1
        return 20

    def ask(self, text, max_new_tokens=32, **kw):
        key = (self.episode, self.frames - 1, text)
        got = self.answers[key][self.used[key]] if key in self.answers else "xyzzy"
        self.used[key] += 1
        return SimpleNamespace(text=got, finish_reason="eos", latency_s=0.0)

    def stats(self):
        return {"tokens_stored": 20 * self.frames, "tokens_seen": 20 * self.frames}


def _equivalent(answer: str) -> str:
    """The truth as a model might phrase it: action keys reordered and spaced differently, text capitalised."""
    if answer.startswith("{"):
        d = json.loads(answer)
        return json.dumps(dict(reversed(list(d.items()))), separators=(",", ":"))
    return answer.capitalize() + "."


@pytest.mark.parametrize("truthful", [True, False])
def test_truth_scores_100_and_garbage_scores_0(tmp_path, truthful):
    seeds, frames, questions = (3, 4, 5), 80, 24
    answers = defaultdict(list)
    for s in seeds:
        ep = world.make_episode(s, frames, questions)
        for e in ep.events:
            answers[(_key(ep.frames[0].rgb), e.frame, e.question)].append(_equivalent(e.answer) if truthful else
                                                                         "a " + e.answer + " maybe")
    assert recall.main(["--seeds", *map(str, seeds), "--frames", str(frames), "--questions", str(questions),
                        "--out", str(tmp_path)], session_factory=lambda spec, cfg: Scripted(answers)) == 0
    res = json.loads((tmp_path / "recall.json").read_text())
    assert set(res["policies"]) == POLICIES
    kinds = {r["kind"] for r in res["records"]}
    assert kinds == set(world.KINDS) and sum(c["n"] > 0 for c in res["policies"]["h2o"]["by_bucket"].values()) >= 4
    want = 1.0 if truthful else 0.0
    for e in res["policies"].values():
        cells = [e["overall"], *e["by_bucket"].values(), *e["by_kind"].values(), e["past_beyond_window"]]
        assert all(c["accuracy"] == want for c in cells if c["n"]), e
        assert e["valid_actions"] == want  # the truth's action JSON (reordered) is valid, "a {...} maybe" is not
    assert res["majority"]["overall"]["accuracy"] not in (0.0, 1.0)


def test_missing_model_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="no model at"):
        recall.main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown policies"):
        recall.policy_specs(names=["sadle"])


def test_report_has_a_recall_section(tiny_run, tmp_path):
    from infmllm_ros.bench.cli import COMMANDS

    assert COMMANDS["recall"][0] == "infmllm_ros.bench.recall"
    res, out = tiny_run
    results = tmp_path / "bench"
    shutil.copytree(out, results)
    (results / "recall.png").unlink()  # regenerated from the JSON
    output = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(results), "--output", str(output)]) == 0
    md = output.read_text()
    assert "## Recall vs distance (recall.json)" in md and "![recall](bench/recall.png)" in md
    assert "| saddle[linear,1] |" in md and res["command"] in md and "held-out questions at budget 48" in md
    assert (results / "recall.png").stat().st_size > 0


def test_target_compares_the_best_saddle_with_streaming_llm_beyond_the_window():
    def rec(policy, distance, ok, kind="past"):
        return {"policy": policy, "kind": kind, "distance": distance, "bucket": recall.bucket(distance),
                "correct": ok, "template": "colour_past", "truth": "red"}

    oks = {"streaming_llm": [True, False, True, False], "saddle[linear,1]": [True, True, True, False],
           "saddle[none,0]": [False, False, False, True]}
    records = [rec(p, d, ok) for p, v in oks.items() for d, ok in zip((5, 9, 20, 70), v, strict=True)]
    records += [rec(p, 2, p == "streaming_llm") for p in oks]  # inside the window: not counted
    records += [rec(p, 8, False, kind="action") for p in oks]  # not a past question: not counted
    per = {p: recall.tables([r for r in records if r["policy"] == p], window_frames=4) for p in oks}
    assert per["streaming_llm"]["past_beyond_window"] == {"n": 4, "correct": 2, "accuracy": 0.5}
    t = recall.target(per, records, window_frames=4)
    assert t["best_saddle"] == "saddle[linear,1]" and t["delta_points"] == 25.0 and t["met"]
    assert (t["only_saddle_right"], t["only_streaming_llm_right"]) == (1, 0)

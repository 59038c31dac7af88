"""infmllm-bench recall-archive: the harness on a tiny random-weight VLM (accuracy is meaningless there): every arm
runs, the equal-GPU-bytes arms really have equal K/V bytes, the archive arms read pages, and the report renders it."""

import json

import pytest
import torch

from infmllm_ros import world
from infmllm_ros.bench import recall_archive, report

SEEDS, FRAMES, BUDGET = (0,), 12, 48
ARGS = ["--seeds", *map(str, SEEDS), "--frames", str(FRAMES), "--budget", str(BUDGET), "--max-new-tokens", "3",
        "--threads", "1", "--archive-mb", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from infmllm_ros.engine.tiny import tiny_model

    torch.set_num_threads(1)
    model, proc = tiny_model("llava_llama")
    out = tmp_path_factory.mktemp("recall_archive")
    assert recall_archive.main([*ARGS, "--out", str(out)], model=model, processor=proc) == 0
    return json.loads((out / "recall_archive.json").read_text()), out


def test_every_arm_runs_on_the_same_questions(tiny_run):
    res, _ = tiny_run
    (run,) = res["runs"]
    n = sum(len(world.make_episode(s, FRAMES, FRAMES // 3).events) for s in SEEDS)
    assert run["n_questions"] == n > 0
    arms = run["policies"]
    assert {"full", "streaming_llm", "streaming_llm@gpu", "simplestream", "saddle[linear,2]",
            "saddle[linear,2]@gpu", "saddle[linear,2]+archive", "saddle[linear,2]+archive[question]"} == set(arms)
    for e in arms.values():
        assert "skipped" not in e and e["overall"]["n"] == n
    same = {arms[a]["kv_bytes"] for a in ("streaming_llm@gpu", "simplestream", "saddle[linear,2]@gpu",
                                          "saddle[linear,2]+archive")}
    assert len(same) == 1 and arms["saddle[linear,2]"]["kv_bytes"] < same.pop()  # recall slots cost GPU bytes
    arch = arms["saddle[linear,2]+archive"]
    assert 0 < arch["archive_bytes"] <= 2**20 and arch["bytes_read_mean"] > 0 and arch["recalled_frames_mean"] > 0
    assert arms["saddle[linear,2]"]["bytes_read_mean"] == 0


def test_report_renders_it(tiny_run):
    res, out = tiny_run
    page = out / "BENCHMARKS.md"
    assert report.main(["--results", str(out), "--output", str(page)]) == 0
    text = page.read_text()
    assert "Long-term memory: frame archive + recall" in text and "saddle[linear,2]+archive" in text
    assert (out / "recall_archive.png").is_file()


def test_by_template_counts_past_questions_beyond_the_window():
    def row(policy, template, distance, correct, kind="past"):
        return dict(policy=policy, template=template, distance=distance, correct=correct, kind=kind)

    run = {"window_frames": 4, "records": [
        row("full", "after", 9, True), row("full", "after", 5, False), row("full", "after", 4, True),  # 4: inside
        row("full", "where_past", 30, False), row("full", "goto", 0, True, kind="action"),
        row("saddle+archive", "after", 12, False), row("saddle+archive", "where_past", 7, True)]}  # fmt: skip
    lines = recall_archive.by_template(run)
    table = lines[1].splitlines()
    assert table[0].replace(" ", "") == "|arm|after|where_past|"
    assert table[2].replace(" ", "") == "|full|50%(2)|0%(1)|"
    assert table[3].replace(" ", "") == "|saddle+archive|0%(1)|100%(1)|"
    assert recall_archive.by_template({"window_frames": 4}) == []  # a json without per-question rows


def test_oracle_recalls_the_answer_frame_first_and_never_a_held_one():
    from types import SimpleNamespace

    frames = {f: SimpleNamespace(stamp=100.0 + f) for f in range(6)}
    held = {2: 1.0}  # frame 2 is still in the cache

    def held_fraction(cache, ids):
        return torch.tensor([held.get(i, 0.0) for i in ids])

    def state(k):
        return SimpleNamespace(archive=SimpleNamespace(frames=frames), recall_frames=k, held_fraction=held_fraction)

    after = {"stamps": [104.0, 101.0]}  # an "after" question: answer shown in frame 4, named object in frame 1
    assert recall_archive.oracle_choice(state(1), after)(None, None, None) == [4]
    assert recall_archive.oracle_choice(state(2), after)(None, None, None) == [4, 1]
    assert recall_archive.oracle_choice(state(2), {"stamps": [102.0]})(None, None, None) == []  # held: not recalled
    assert recall_archive.oracle_choice(state(1), {"stamps": []})(None, None, None) == []

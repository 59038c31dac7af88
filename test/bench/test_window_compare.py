"""window-compare: two text and two recall results -> one side-by-side summary the report renders; runs that
differ in more than the window are refused."""

import pytest

from infmllm_ros.bench import report, window_compare

MACHINE = {"cpu": "AMD EPYC", "cores": 2, "torch_threads": 1, "torch": "2.13.0", "transformers": "5.24.0",
           "platform": "Linux"}


def text(window, ratio):
    rows = [{"policy": "reference_recompute", "budget": 64, "ppl": 3.0, "ratio_to_reference": 1.0},
            {"policy": "streaming_llm", "budget": 64, "ppl": 3.1, "ratio_to_reference": 1.03},
            {"policy": "saddle[none,0]", "budget": 64, "ppl": 3.0 * ratio, "ratio_to_reference": ratio}]
    return {"kind": "text_ppl", "model": "m", "tokens": 100, "chunk": 64, "budgets": [64], "rows": rows,
            "machine": MACHINE, "commit": "abc", "command": f"infmllm-bench text --tokens 100 --window {window}"}


def recall(window, acc):
    e = lambda a: {"overall": {"accuracy": a, "n": 10}, "past_beyond_window": {"accuracy": a / 2, "n": 4}}  # noqa: E731
    return {"kind": "recall", "model": "v", "seeds": [0], "n_questions": 10, "budget": 128, "frame_tokens": 26,
            "window_frames": 4, "policies": {"streaming_llm": e(0.5), "saddle[none,0]": e(acc)},
            "machine": MACHINE, "commit": "abc", "command": f"infmllm-bench recall --seeds 0 --window {window}"}


def test_summary_side_by_side():
    res = window_compare.build({0: text(0, 1.02), 32: text(32, 1.05)}, {0: recall(0, 0.6), 32: recall(32, 0.55)})
    assert res["text"]["by_window"]["0"]["64"]["saddle[none,0]"]["ratio"] == 1.02
    assert res["text"]["by_window"]["32"]["64"]["saddle[none,0]"]["ratio"] == 1.05
    assert res["recall"]["by_window"]["32"]["saddle[none,0]"]["all"] == 0.55
    md = window_compare.markdown(res)
    assert "| saddle[none,0] | 1.0200 | 1.0500 |" in md
    assert "| saddle[none,0] | 60.0 % (10) | 55.0 % (10) | 30.0 % (4) | 27.5 % (4) |" in md
    f = window_compare.findings("w.json", res)
    assert "x1.0200" in f[0] and "x1.0500" in f[0] and "60.0 vs 55.0 %" in f[1]
    assert report.RENDERERS["window_compare"] is window_compare


def test_runs_differing_in_more_than_the_window_are_refused():
    other = text(32, 1.05)
    other["command"] = "infmllm-bench text --tokens 200 --window 32"
    with pytest.raises(SystemExit, match="differ in more than the window"):
        window_compare.build({0: text(0, 1.0), 32: other}, {0: recall(0, 0.6), 32: recall(32, 0.5)})

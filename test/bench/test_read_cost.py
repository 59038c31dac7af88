"""read-cost: the JSON it writes (bytes checked by hand), and its section in the report. Timings are not asserted."""

import json

from infmllm_ros.bench import read_cost, report


def test_read_cost_writes_both_paths_and_renders(tmp_path):
    out = tmp_path / "bench"
    assert read_cost.main(["--budget", "24", "--chunk", "8", "--new", "4", "--reps", "2", "--out", str(out)]) == 0
    res = json.loads((out / "read_cost.json").read_text())
    kinds = [(r["rope"], r["dtype"]) for r in res["rows"]]
    assert kinds == [("1d", "float32"), ("1d", "bfloat16"), ("mrope", "float32"), ("mrope", "bfloat16")]
    for r in res["rows"]:
        assert r["slots"] == 24 + 8 + 4
        one = 1 * 2 * r["slots"] * 128 * (4 if r["dtype"] == "float32" else 2)  # layers x KV heads x slots x dim
        assert r["rotate_on_read_kv_bytes"] == 2 * one and r["extra_bytes"] == one  # K + V, and one more K
        assert r["rotate_on_read_step_ms"] > 0 and r["read_copy_step_ms"] > 0 and r["read_copy_rebuild_ms"] > 0
    assert res["command"] == "infmllm-bench read-cost --budget 24 --chunk 8 --new 4 --reps 2 --out " + str(out)
    output = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(out), "--output", str(output)]) == 0
    md = output.read_text()
    assert "## Reading the keys per decode step (read_cost.json)" in md and res["command"] in md
    assert "| mrope | bfloat16 |" in md and (out / "read_cost.png").exists()

import json

import pytest

from infmllm_ros.bench import cost


def test_cost_rows_for_every_policy(results_dir):
    res = json.loads((results_dir / "cost.json").read_text())
    assert res["kind"] == "cost" and res["lengths"] == [256, 512]
    by = {}
    for r in res["rows"]:
        by.setdefault(r["policy"], []).append(r)
    assert set(by) == {s.name for s in cost.cost_policies()}
    assert [r["length"] for r in by["full_absolute"]] == [256]  # --full-max 256
    assert "full_absolute" in res["skipped"]
    for name in ("streaming_llm", "h2o", "saddle[linear,1]"):
        rows = by[name]
        assert [r["length"] for r in rows] == [256, 512]
        assert all(r["stored_tokens"] <= 64 for r in rows)  # budget 64 after every eviction
        assert rows[0]["stored_kv_bytes"] == rows[1]["stored_kv_bytes"]  # flat
        assert rows[0]["allocated_kv_bytes"] == rows[1]["allocated_kv_bytes"]
        assert all(r["chunk_ms"] > 0 and r["peak_rss_bytes"] > 0 for r in rows)
    assert by["full_absolute"][0]["stored_tokens"] == 256
    assert by["full_absolute"][0]["stored_kv_bytes"] == 4 * by["streaming_llm"][0]["stored_kv_bytes"]
    assert all(r["chunk_ms_vs_streaming_llm"] == 1.0 for r in by["streaming_llm"])
    assert res["isolated"] is False and "round robin" in (results_dir / "cost.md").read_text()
    assert (results_dir / "cost.png").stat().st_size > 0 and "ms / chunk" in (results_dir / "cost.md").read_text()


@pytest.mark.slow
def test_isolated_worker_process(tiny_model_dir):
    """The default mode: a policy runs in its own process, so its memory peak is its own."""
    args = cost.parse(["--model", str(tiny_model_dir), "--budget", "32", "--chunk", "32", "--threads", "1"])
    args.device = "cpu"
    spec = next(s for s in cost.cost_policies() if s.name == "streaming_llm")
    rows = cost.run_isolated(spec, [128], args, cost.torch.float32)
    assert len(rows) == 1 and rows[0]["policy"] == "streaming_llm" and rows[0]["stored_tokens"] == 32

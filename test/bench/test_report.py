import json
import shutil

from infmllm_ros.bench import report


def test_benchmarks_md_regenerates_from_results(results_dir, tmp_path):
    results = tmp_path / "bench"
    shutil.copytree(results_dir, results)
    (results / "text_ppl.png").unlink()  # regenerated from the JSON when missing
    output = tmp_path / "docs" / "BENCHMARKS.md"
    assert report.main(["--results", str(results), "--output", str(output)]) == 0
    md = output.read_text()
    text = json.loads((results / "text_ppl.json").read_text())
    assert md.startswith("# Benchmarks") and "do not edit by hand" in md
    assert "## Quality (text_ppl.json)" in md and "## Cost (cost.json)" in md
    assert "| policy | PPL | x reference |" in md and "Budget 32" in md and "saddle[linear,1]" in md
    assert text["machine"]["cpu"] in md and text["commit"] in md
    assert text["command"] in md and "infmllm-bench cost --model" in md and "apt-get install -y bible-kjv" in md
    assert "![text_ppl](../bench/text_ppl.png)" in md and (results / "text_ppl.png").stat().st_size > 0
    assert "more than 5 % above it" in md
    report.main(["--results", str(results), "--output", str(output)])
    assert output.read_text() == md  # deterministic: same results, same page


def test_cache_cost_results_get_a_section(tmp_path):
    """The cache engineer's cache_cost JSON (its own format) is rendered too, with its plot."""
    rows = [{"policy": p, "length": n, "chunk_ms": 1.0 + (p == "full") * n / 1024, "stored": s,
             "stored_kv_bytes": s * 1024, "buffer_bytes": 2**20, "latency_ratio": 1.0, "stored_kv_ratio": s / 64}
            for n in (256, 512) for p, s in (("streaming_llm", 64), ("full", n))]
    res = {"benchmark": "cache_cost", "machine": {"platform": "Linux", "cpu": "TestCPU 9000", "cores": 2,
           "torch_threads": 1, "torch": "2.13.0", "gpu": None}, "args": {"lengths": [256, 512], "chunk": 32,
           "budget": 64, "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2}, "wall_s": 1.5, "rows": rows}
    (tmp_path / "cache_cost_cpu.json").write_text(json.dumps(res))
    output = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(tmp_path), "--output", str(output)]) == 0
    md = output.read_text()
    assert "## Cache cost (cache_cost_cpu.json)" in md and "TestCPU 9000" in md
    assert "infmllm-bench cache-cost --lengths 256 512 --chunk 32 --budget 64" in md
    assert "| full | 512 | 1.5 |" in md and (tmp_path / "cache_cost_cpu.png").exists()


def test_report_without_results(tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(tmp_path / "none"), "--output", str(output)]) == 0
    assert "No results yet" in output.read_text()


def test_budget_beyond_the_trained_context_is_noted(results_dir, tmp_path):
    res = json.loads((results_dir / "text_ppl.json").read_text())
    assert res["model_info"]["max_position_embeddings"] == 64 and res["chunk"] == 32
    from infmllm_ros.bench import text_ppl

    assert text_ppl.beyond_context(res) == [64]  # 64 + 32 > 64; 32 + 32 is not
    assert "**Note**: at budget 64" in text_ppl.markdown(res)

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


def test_report_without_results(tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(tmp_path / "none"), "--output", str(output)]) == 0
    assert "No results yet" in output.read_text()

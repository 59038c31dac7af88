"""infmllm-bench's command line: each subcommand's own --help, and where results go by default."""

import importlib
from pathlib import Path

import pytest

from infmllm_ros.bench import cli

REPO = Path(__file__).resolve().parents[2]


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse re-wraps text: compare word sequences


@pytest.mark.parametrize("sub", list(cli.COMMANDS))
def test_each_subcommand_prints_its_own_help(capsys, sub):
    out = _help(capsys, [sub, "--help"])
    module = importlib.import_module(cli.COMMANDS[sub][0])
    first_line = " ".join(module.__doc__.strip().splitlines()[0].split())
    assert first_line in out, out[:400]  # the module's own description ...
    assert "subcommands:" not in out  # ... not the top-level list of subcommands


def test_top_level_help_lists_every_subcommand(capsys):
    out = _help(capsys, ["--help"])
    assert all(f"{sub} {text}" in out for sub, (_, text) in cli.COMMANDS.items())
    assert _help(capsys, []) == out
    assert "--report" in _help(capsys, ["all", "--help"])


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["nope", "--help"])
    assert done.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_results_default_to_bench_results_in_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for sub in ("cost", "text", "recall", "train-lm"):  # every measurement's --out default
        module = importlib.import_module(cli.COMMANDS[sub][0])
        assert (tmp_path / module.parse([]).out).resolve() == tmp_path / "bench_results", sub
    assert cli.main(["report"]) == 0
    assert (tmp_path / "bench_results" / "BENCHMARKS.md").read_text().startswith("# Benchmarks")
    assert not (REPO / "bench_results").exists()


def test_all_passes_out_and_report_on(tmp_path, monkeypatch):
    calls = []

    def fake(name):
        return type("M", (), {"main": staticmethod(lambda argv: calls.append((name, argv)) or 0)})

    monkeypatch.setattr(cli.importlib, "import_module", fake)
    assert cli.main(["all", "--out", "docs/bench", "--report", "docs/BENCHMARKS.md"]) == 0
    assert calls == [(cli.COMMANDS[n][0], ["--out", "docs/bench"]) for n in cli.ALL[:-1]] + [
        ("infmllm_ros.bench.report", ["--results", "docs/bench", "--output", "docs/BENCHMARKS.md"])]


def test_make_bench_writes_into_the_source_tree_docs():
    line = next(x for x in (REPO / "Makefile").read_text().splitlines() if "infmllm-bench all" in x)
    assert "--out docs/bench" in line and "--report docs/BENCHMARKS.md" in line

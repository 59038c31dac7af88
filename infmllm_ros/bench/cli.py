"""infmllm-bench: benchmarks of the bounded cache, the session and the embedded models.

Each subcommand lives in its own module and is imported only when asked for (transformers takes seconds
to import); `infmllm-bench SUB --help` is that module's own help. Results go to ./bench_results unless --out
says otherwise (`make bench` in the source tree writes docs/bench and docs/BENCHMARKS.md)."""

import argparse
import importlib
import sys

# The one registry of subcommands: name -> (module with a main(argv) function, one-line help).
COMMANDS = {
    "cache-cost": ("infmllm_ros.bench.cache_cost", "per-chunk latency and KV bytes vs stream length, every policy"),
    "read-cost": ("infmllm_ros.bench.read_cost", "stored keys read per decode step: rotate-on-read vs read copy"),
    "train-lm": ("infmllm_ros.bench.train_lm", "train the in-house byte-level Llama on the KJV text (time-boxed)"),
    "text": ("infmllm_ros.bench.text_ppl", "streaming perplexity of every policy vs the recompute reference"),
    "cost": ("infmllm_ros.bench.cost", "latency, KV bytes, peak memory vs stream length, ratios to StreamingLLM"),
    "report": ("infmllm_ros.bench.report", "regenerate BENCHMARKS.md from the JSON results"),
    "train-vlm": ("infmllm_ros.bench.train_vlm", "train the embedded robot VLM on the synthetic world (time-boxed)"),
    "recall": ("infmllm_ros.bench.recall", "accuracy vs distance on held-out world episodes, per cache policy"),
    "window-compare": ("infmllm_ros.bench.window_compare", "saddle retrieval window 0 vs 32, side by side"),
    "gpu-check": ("infmllm_ros.bench.gpu_check", "kernels vs references, 1M-token stream, decode vs HBM (CUDA)"),
    "actions": ("infmllm_ros.bench.actions", "action constraint set-up and per-action cost, xgrammar vs lmfe"),
    "real-size": ("infmllm_ros.bench.real_size", "SmolVLM-256M / Qwen2-VL-2B shapes: session vs plain transformers"),
    "evidence": ("infmllm_ros.bench.evidence", "does an answer's top evidence frame show the asked object (vs chance)"),
    "recall-archive": ("infmllm_ros.bench.recall_archive", "frame archive + recall vs policies, SimpleStream, full"),
}

# `all`: every measurement on the committed models, then the report. The trainers are left out on purpose
# (they take 30-45 minutes and rewrite the committed checkpoints); run them by name.
ALL = ("cost", "text", "recall", "evidence", "report")


def top_parser() -> argparse.ArgumentParser:
    epilog = "\n".join([f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items()]
                       + [f"  {'all':<11} {', '.join(ALL)} in turn (options: --out DIR, --report FILE)", "",
                          "infmllm-bench SUB --help shows the options of SUB.",
                          "After colcon build (tools are not on PATH): ros2 run infmllm_ros infmllm-bench SUB ..."])
    parser = argparse.ArgumentParser(prog="infmllm-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="subcommands:\n" + epilog)
    parser.add_argument("command", choices=list(COMMANDS) + ["all"], metavar="SUB", help="subcommand (below)")
    return parser


def all_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infmllm-bench all", description=f"Run {', '.join(ALL)} in turn with "
                                     "their default settings; run a subcommand by name to pass other options.")
    parser.add_argument("--out", default=None, help="results folder of every measurement (default ./bench_results)")
    parser.add_argument("--report", default=None, help="where the report goes (default OUT/BENCHMARKS.md)")
    return parser


def all_argv(name: str, args: argparse.Namespace) -> list[str]:
    """The options `all` passes to one of its subcommands."""
    if name == "report":
        return (["--results", args.out] if args.out else []) + (["--output", args.report] if args.report else [])
    return ["--out", args.out] if args.out else []


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # The subcommand is the first word; everything after it is its own (its --help included).
    if not argv or argv[0].startswith("-"):
        top_parser().parse_args(argv[:1] or ["--help"])  # prints help (or a usage error) and exits
    command, rest = top_parser().parse_args(argv[:1]).command, argv[1:]
    if command != "all":
        return importlib.import_module(COMMANDS[command][0]).main(rest) or 0
    args = all_parser().parse_args(rest)
    rc = 0
    for name in ALL:
        rc = rc or (importlib.import_module(COMMANDS[name][0]).main(all_argv(name, args)) or 0)
    return rc


if __name__ == "__main__":
    sys.exit(main())

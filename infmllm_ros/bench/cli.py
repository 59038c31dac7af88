"""infmllm-bench: benchmarks of the bounded cache, the session and the embedded models.

Each subcommand lives in its own module and is imported only when asked for (transformers takes seconds
to import)."""

import argparse
import importlib
import sys

# subcommand -> (module with a main(argv) function, one-line help)
COMMANDS = {
    "cache-cost": ("infmllm_ros.bench.cache_cost", "per-chunk latency and KV bytes vs stream length, every policy"),
    "train-lm": ("infmllm_ros.bench.train_lm", "train the in-house byte-level Llama on the KJV text (time-boxed)"),
    "text": ("infmllm_ros.bench.text_ppl", "streaming perplexity of every policy vs the recompute reference"),
    "cost": ("infmllm_ros.bench.cost", "latency, KV bytes, peak memory vs stream length, ratios to StreamingLLM"),
    "report": ("infmllm_ros.bench.report", "regenerate docs/BENCHMARKS.md from the JSON results"),
    "train-vlm": ("infmllm_ros.bench.train_vlm", "train the embedded robot VLM on the synthetic world (time-boxed)"),
    "recall": ("infmllm_ros.bench.recall", "accuracy vs distance on held-out world episodes, per cache policy"),
    "evidence": ("infmllm_ros.bench.evidence", "does an answer's top evidence frame show the asked object (vs chance)"),
}

# `all`: every measurement on the committed models, then the report. The trainers are left out on purpose
# (they take 30-45 minutes and rewrite the committed checkpoints); run them by name.
ALL = ("cost", "text", "recall", "evidence", "report")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="infmllm-bench", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=sorted(COMMANDS) + ["all"], help="; ".join(
        f"{name}: {text}" for name, (_, text) in sorted(COMMANDS.items())) + f"; all: {', '.join(ALL)}")
    args, rest = parser.parse_known_args(argv)
    if args.command == "all" and rest:
        parser.error("`all` takes no options; run a subcommand by name to pass options")
    names = ALL if args.command == "all" else [args.command]
    rc = 0
    for name in names:
        module = importlib.import_module(COMMANDS[name][0])
        rc = rc or (module.main(rest) or 0)
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""infmllm-bench report: BENCHMARKS.md generated from the JSON results (never edited by hand).

Reads every `*.json` results file under --results (default ./bench_results; `make bench`: docs/bench), renders
each with its own module's markdown function, links its PNG (regenerated from the JSON when missing), and adds
the machines, the commits and the exact commands that reproduce every number.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from infmllm_ros.bench import (
    actions,
    cache_cost_view,
    cache_scaling_view,
    common,
    cost,
    evidence,
    gpu_check_view,
    metrics,
    read_cost,
    real_size_view,
    recall,
    recall_archive,
    text_ppl,
    train_lm,
    window_compare,
)

RENDERERS = {"train_lm": train_lm, "text_ppl": text_ppl, "cost": cost, "cache_cost": cache_cost_view,
             "cache_layer_scaling": cache_scaling_view, "read_cost": read_cost, "recall": recall,
             "recall_archive": recall_archive, "evidence": evidence, "window_compare": window_compare,
             "real_size": real_size_view, "actions": actions, "gpu_check": gpu_check_view}
ORDER = ["train_lm", "text_ppl", "cost", "cache_cost", "cache_layer_scaling", "read_cost", "recall", "recall_archive",
         "evidence", "window_compare", "real_size", "actions", "gpu_check"]
TITLES = {"train_lm": "Model", "text_ppl": "Quality", "cost": "Cost", "cache_cost": "Cache cost",
          "cache_layer_scaling": "Eviction cost vs layers", "read_cost": "Reading the keys per decode step",
          "recall": "Recall vs distance", "recall_archive": "Long-term memory (frame archive)",
          "evidence": "Answer evidence", "window_compare": "Retrieval window",
          "real_size": "Real-size shapes vs plain transformers", "actions": "Constrained actions",
          "gpu_check": "GPU check"}
SETUP = ["apt-get install -y bible-kjv            # the KJV text (Debian bible-kjv + bible-kjv-text), as root",
         "pip install -e . && pip install matplotlib"]


def load_results(folder: Path) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            res = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"report: {path} is not valid JSON: {e}") from e
        if isinstance(res, dict) and res.get("benchmark") == "cache_cost" and "kind" not in res:
            res = {**res, "kind": "cache_cost", "command": cache_cost_view.command(res), "commit": "?"}
        if isinstance(res, dict) and res.get("benchmark") == "cache_layer_scaling" and "kind" not in res:
            res = {**res, "kind": "cache_layer_scaling", "command": cache_scaling_view.command(res), "commit": "?"}
        if isinstance(res, dict) and res.get("kind") in RENDERERS:
            found.append((path, res))
    found.sort(key=lambda pr: (ORDER.index(pr[1]["kind"]), pr[0].name))
    return found


def findings(results: list[tuple[Path, dict]]) -> list[str]:
    """Plain statements computed from the numbers (flags and detectors), one per line."""
    out = []
    for path, res in results:
        if res["kind"] == "train_lm":
            out.append(f"`{path.name}`: in-house model trained {res['train_seconds']:.0f} s, held-out loss "
                       f"{res['final_held_loss']:.3f} nats/byte (start {res['start_loss']:.3f}).")
        elif res["kind"] == "text_ppl":
            for b in res["budgets"]:
                rows = [r for r in res["rows"] if r["budget"] == b and "skipped" not in r
                        and r["policy"] not in ("reference_recompute", "full_absolute")]
                if not rows:
                    continue
                best = min(rows, key=lambda r: r["ratio_to_reference"])
                flagged = [f"{r['policy']} (x{r['ratio_to_reference']:.3f})" for r in rows if r["flagged"]]
                out.append(f"`{path.name}`, budget {b}: best {best['policy']} x{best['ratio_to_reference']:.4f} of the "
                           f"recompute reference; more than {100 * (metrics.FLAG_RATIO - 1):.0f} % above it: "
                           + (", ".join(flagged) if flagged else "none") + ".")
            full = [r for r in res["rows"] if r["policy"] == "full_absolute"]
            if full:
                r = full[-1]
                out.append(f"`{path.name}`: full cache with absolute positions over {r['tokens']} tokens (trained/max "
                           f"positions {res['model_info']['max_position_embeddings']}): x{r['ratio_to_reference']:.2f} "
                           f"of the reference at budget {r['budget']}, last window x{r['window_ratios'][-1]:.2f}; "
                           f"collapse detected: {'yes' if r['collapsed'] else 'no'}.")
            if res.get("skipped"):
                out.append(f"`{path.name}`: bounded policies skipped: {res['skipped']}.")
            over = text_ppl.beyond_context(res)
            if over:
                out.append(f"`{path.name}`: budget {', '.join(map(str, over))} + chunk {res['chunk']} passes the "
                           f"model's {res['model_info']['max_position_embeddings']} trained positions (see the note).")
        elif res["kind"] in ("cost", "cache_cost"):
            longest = max((r["length"] for r in res["rows"]), default=0)
            at = [r for r in res["rows"] if r["length"] == longest]
            parts = [f"{r['policy']} {r['chunk_ms']:.1f} ms/chunk, {r['stored_kv_bytes'] / 2**20:.1f} MiB KV"
                     for r in at]
            out.append(f"`{path.name}` at {longest} tokens: " + "; ".join(parts) + ".")
        elif res["kind"] == "recall":
            out += recall.findings(path.name, res)
        elif res["kind"] in ("window_compare", "gpu_check", "evidence", "recall_archive"):
            out += RENDERERS[res["kind"]].findings(path.name, res)
    return out


def render(results: list[tuple[Path, dict]], output: Path) -> str:
    lines = ["# Benchmarks", "",
             "Generated by `infmllm-bench report` from the JSON results under "
             f"`{_rel(results[0][0].parent, output) if results else 'docs/bench'}`: do not edit by hand, rerun the "
             "commands below and regenerate.", ""]
    if not results:
        return "\n".join(lines + ["No results yet: run the commands below.", "", *_reproduce([])])
    lines += ["## Findings (computed from the results)", ""] + [f"- {f}" for f in findings(results)] + [""]
    for path, res in results:
        module = RENDERERS[res["kind"]]
        lines += [f"## {TITLES[res['kind']]} ({path.name})",
                  "", module.markdown(res).strip(), ""]
        png = path.with_suffix(".png")
        if not png.exists():
            module.plot(res, png)
        lines += [f"![{path.stem}]({_rel(png, output)})", ""]
    if not any(r["kind"] == "gpu_check" for _, r in results):
        lines += ["## GPU check", "", "`make gpu-check` (kernels on CUDA in fp32/bf16/fp16, a 1M-token stream on a "
                  "7B-wide random model, decode vs HBM bound, eviction cost at 4 / 16 / 32 layers) has not run yet: "
                  "no GPU result under this folder.", ""]
    lines += ["## Machines and commits", ""]
    lines += [f"- `{p.name}`: {common.describe_machine(cache_cost_view.full_machine(r['machine']))}; "
              f"commit `{r['commit']}`" for p, r in results]
    lines += ["", "## Reproduce", "", *_reproduce(results)]
    return "\n".join(lines) + "\n"


def _reproduce(results) -> list[str]:
    cmds = SETUP + [_command(r) for _, r in results] + ["infmllm-bench report"]
    return ["```bash", *cmds, "```"]


def _command(res: dict) -> str:
    # results from before the --window option ran the saddle with the last 32 queries (now the default is 0)
    old_window = res["kind"] in ("text_ppl", "recall") and "retrieval_window" not in res
    return res["command"] + (" --window 32" if old_window else "")


def _rel(path: Path, output: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(output).resolve().parent)


def parse(argv):
    p = argparse.ArgumentParser(prog="infmllm-bench report", description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(common.DEFAULT_OUT), help="folder of results JSON files")
    p.add_argument("--output", default=None, help="the page to write (default RESULTS/BENCHMARKS.md; "
                   "`make bench`: docs/BENCHMARKS.md)")
    args = p.parse_args(argv)
    args.output = args.output or str(Path(args.results) / "BENCHMARKS.md")
    return args


def main(argv=None):
    args = parse(argv)
    common.print_machine(common.machine())
    results = load_results(Path(args.results))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(results, output))
    print(f"wrote {output} from {len(results)} results file(s)")
    return 0

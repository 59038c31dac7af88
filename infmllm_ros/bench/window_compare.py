"""window-compare: the saddle's retrieval window, whole chunk (window 0, the paper's) vs the last 32 queries.

Reads a `text` and a `recall` result for each window (run with `--window 0` and `--window 32` on the same
settings), checks they differ only in the window, and writes one summary json (kind "window_compare") that
`infmllm-bench report` renders: PPL / reference per budget and recall accuracy per policy, side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from infmllm_ros.bench import common

IGNORED = {"--window", "--name", "--out"}  # options allowed to differ between the two runs


def _settings(command: str) -> list[str]:
    """The command line without the options that may differ (window, output names)."""
    words, out, skip = command.split(), [], False
    for w in words:
        if skip:
            skip = False
            continue
        if w in IGNORED:
            skip = True
            continue
        out.append(w)
    return out


def text_rows(res: dict) -> dict:
    """{budget: {policy: {"ppl", "ratio"}}} of the bounded policies (the reference is 1 by definition)."""
    out: dict = {}
    for r in res["rows"]:
        if "skipped" in r or r["policy"] in ("reference_recompute", "full_absolute"):
            continue
        out.setdefault(str(r["budget"]), {})[r["policy"]] = {"ppl": r["ppl"], "ratio": r["ratio_to_reference"]}
    return out


def recall_rows(res: dict) -> dict:
    """{policy: {"all": acc, "n": n, "past_beyond_window": acc, "n_past": n}}."""
    out = {}
    for name, e in res["policies"].items():
        if "skipped" in e:
            continue
        out[name] = {"all": e["overall"]["accuracy"], "n": e["overall"]["n"],
                     "past_beyond_window": e["past_beyond_window"]["accuracy"], "n_past": e["past_beyond_window"]["n"]}
    return out


def build(text: dict[int, dict], recall: dict[int, dict]) -> dict:
    """text / recall: {window: results dict} for windows 0 and 32."""
    for kind, runs in (("text", text), ("recall", recall)):
        a, b = (_settings(r["command"]) for r in runs.values())
        if a != b:
            raise SystemExit(f"window-compare: the {kind} runs differ in more than the window: {a} vs {b}")
    t0, r0 = text[0], recall[0]
    rec = {w: r.get("records") for w, r in recall.items()}
    differ = None
    if all(rec.values()):  # same episodes, same order: count the answers the window changed
        differ = sum(a["got"] != b["got"] for a, b in zip(rec[0], rec[32], strict=True))
    return {
        "kind": "window_compare", "windows": sorted(text),
        "text": {"model": t0["model"], "tokens": t0["tokens"], "chunk": t0["chunk"], "budgets": t0["budgets"],
                 "commands": {str(w): r["command"] for w, r in text.items()},
                 "by_window": {str(w): text_rows(r) for w, r in text.items()}},
        "recall": {"model": r0["model"], "seeds": r0["seeds"], "n_questions": r0["n_questions"],
                   "budget": r0["budget"], "frame_tokens": r0["frame_tokens"], "window_frames": r0["window_frames"],
                   "commands": {str(w): r["command"] for w, r in recall.items()}, "answers_differ": differ,
                   "answers": len(rec[0]) if rec[0] else None,
                   "by_window": {str(w): recall_rows(r) for w, r in recall.items()}},
        "machine": t0["machine"], "commit": t0["commit"],
    }  # fmt: skip


def findings(name: str, res: dict) -> list[str]:
    """Per budget, the best saddle at each window; recall accuracy of each saddle at both windows."""
    t, r, ws = res["text"], res["recall"], [str(w) for w in res["windows"]]
    out = []
    for b in t["budgets"]:
        best = {w: min(((p, v["ratio"]) for p, v in t["by_window"][w][str(b)].items() if p.startswith("saddle")),
                       key=lambda pv: pv[1]) for w in ws}
        out.append(f"`{name}`, text budget {b}: best saddle with the {_w(ws[0])} window {best[ws[0]][0]} "
                   f"x{best[ws[0]][1]:.4f}, with the {_w(ws[1])} window {best[ws[1]][0]} x{best[ws[1]][1]:.4f}.")
    parts = [f"{p} {100 * r['by_window'][ws[0]][p]['all']:.1f} vs {100 * r['by_window'][ws[1]][p]['all']:.1f} %"
             for p in r["by_window"][ws[0]] if p.startswith("saddle")]
    out.append(f"`{name}`, recall ({r['n_questions']} questions), {_w(ws[0])} vs {_w(ws[1])}: "
               + ", ".join(parts) + ".")
    return out


def _w(w: str) -> str:
    return "whole chunk" if w == "0" else f"last {w}"


def markdown(res: dict) -> str:
    t, r, ws = res["text"], res["recall"], [str(w) for w in res["windows"]]
    lines = ["### Retrieval window: whole chunk vs last 32 queries (`window-compare`)\n",
             f"Saddle only (the other policies do not use the window; they are listed as a check: their numbers must "
             f"not move). {common.describe_machine(res['machine'])}; commit {res['commit']}.\n",
             *([f"**Note**: {res['note']}\n"] if res.get("note") else []),
             f"Text: `{t['model']}`, {t['tokens']} held-out tokens, chunk {t['chunk']} (every chunk has "
             f"{t['chunk']} queries: window 0 lets all of them vote, window 32 the last half). PPL / recompute "
             "reference:\n"]
    for cmd in t["commands"].values():
        lines.append(f"`{cmd}`\n")
    header = ["policy"] + [f"B={b} {_w(w)}" for b in t["budgets"] for w in ws]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    policies = list(t["by_window"][ws[0]][str(t["budgets"][0])])
    for p in policies:
        cells = [f"{t['by_window'][w][str(b)][p]['ratio']:.4f}" for b in t["budgets"] for w in ws]
        lines.append("| " + " | ".join([p] + cells) + " |")
    lines += ["", f"Recall: `{r['model']}`, seeds {r['seeds']} ({r['n_questions']} questions), budget {r['budget']} "
              f"(a frame is {r['frame_tokens']} tokens). Accuracy (n):\n"]
    for cmd in r["commands"].values():
        lines.append(f"`{cmd}`\n")
    header = ["policy"] + [f"all, {_w(w)}" for w in ws] + [f"past > {r['window_frames']} frames, {_w(w)}" for w in ws]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in r["by_window"][ws[0]]:
        e = {w: r["by_window"][w][p] for w in ws}
        cells = [f"{100 * e[w]['all']:.1f} % ({e[w]['n']})" for w in ws]
        cells += [f"{100 * e[w]['past_beyond_window']:.1f} % ({e[w]['n_past']})"
                  if e[w]["past_beyond_window"] is not None else "" for w in ws]
        lines.append("| " + " | ".join([p] + cells) + " |")
    if r.get("answers_differ") is not None:
        lines.append(f"\nAnswers that differ between the two windows: {r['answers_differ']} of {r['answers']} "
                     f"(a frame is {r['frame_tokens']} tokens: with its 2-3 pending tokens a frame chunk fits inside "
                     "the 32-query cap, so both windows are the same vote there; the text benchmark's 64-token "
                     "chunks are where the cap matters).")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    plt = common.pyplot()
    t, ws = res["text"], [str(w) for w in res["windows"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    saddles = [p for p in t["by_window"][ws[0]][str(t["budgets"][0])] if p.startswith("saddle")]
    for p in saddles:
        for w, ls in zip(ws, ("-", "--"), strict=False):
            ax.plot(t["budgets"], [t["by_window"][w][str(b)][p]["ratio"] for b in t["budgets"]], marker="o", ls=ls,
                    label=f"{p} {_w(w)}")
    ax.set_xlabel("budget (tokens)")
    ax.set_ylabel("PPL / reference")
    ax.set_title("retrieval window: whole chunk (solid) vs last 32 (dashed)")
    ax.legend(fontsize=6)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="infmllm-bench window-compare", description=__doc__.splitlines()[0])
    for k in ("text", "recall"):
        for w in (0, 32):
            p.add_argument(f"--{k}-w{w}", required=True, help=f"{k} results json run with --window {w}")
    p.add_argument("--note", default="", help="one sentence shown with the table (e.g. why the sizes are reduced)")
    p.add_argument("--out", default=str(common.DEFAULT_OUT / "window_compare.json"))
    a = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    load = lambda path: json.loads(Path(path).read_text())  # noqa: E731
    res = build({0: load(a.text_w0), 32: load(a.text_w32)}, {0: load(a.recall_w0), 32: load(a.recall_w32)})
    res["note"] = a.note
    res["command"] = common.command_line(["window-compare", *(sys.argv[1:] if argv is None else argv)])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out.with_suffix(".png"))
    print(markdown(res))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

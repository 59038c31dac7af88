"""infmllm-bench evidence: does an answer's top evidence frame show the thing the question asks about?

Held-out world episodes with "past" questions only stream through a real `StreamingSession` (as `recall` feeds them).
Before each question the session's `memory()` lists the frames still held; the question counts when the frame the
answer comes from (`Event.seen_frame`) is among them. Hit = the top frame of `Answer.evidence` shows the asked
object (the shape / colour+shape named in the question, visible by `ObjectView.visible`). Chance = the same rate for
a frame drawn uniformly from the held frames (the fraction of held frames that show the object), averaged over the
same questions. Also reported: top frame == the answer frame exactly, and its chance (1 / held frames). The target,
a clear majority, counts as met when the hit rate's whole 95 % Wilson interval lies above one half.

"Current" questions (about the view now: in front, colour now, where now, count) stream through the same session
from their own episodes (same seeds, `world.make_episode(kinds=("current",))`): there the answer frame is the newest
one, so their measure is how often the top evidence frame is the newest frame (chance 1 / held frames).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from infmllm_ros import world
from infmllm_ros.bench import common, policies
from infmllm_ros.bench.recall import DEFAULT_MODEL, STAMP0

DEFAULT_SEEDS = list(range(16))  # held out: train-vlm trains on seeds >= 1,000,000
DEFAULT_SPEC = "linear:1"
_NAMED = (re.compile(r"what colour was the (\w+) you saw\?"), re.compile(r"where did you last see the (\w+ \w+)\?"),
          re.compile(r"what appeared after the (\w+ \w+)\?"))


def asked_object(question: str):
    """Predicate over ObjectView for the thing a past question names (a shape or a colour + shape)."""
    for pat in _NAMED:
        m = pat.fullmatch(question)
        if m:
            name = m.group(1)
            return (lambda o, n=name: o.name == n) if " " in name else (lambda o, n=name: o.shape == n)
    raise ValueError(f"not a past question of the world: {question!r}")


def shows(frame: world.Frame, pred) -> bool:
    return any(pred(o) for o in frame.seen())


def run_episode(session, ep: world.Episode, max_new_tokens: int) -> list[dict]:
    """Stream the episode, ask its questions; one row per question (past or current)."""
    by_frame = {}
    for e in ep.events:
        by_frame.setdefault(e.frame, []).append(e)
    index_of = {STAMP0 + f.t: f.index for f in ep.frames}
    last = max((e.frame for e in ep.events), default=-1)
    session.reset()
    rows = []
    for f in ep.frames[:last + 1]:
        session.observe(f.rgb, STAMP0 + f.t)
        for e in by_frame.get(f.index, []):
            held = [index_of[fr["stamp"]] for fr in session.memory()["frames"]]
            a = session.ask(e.question, max_new_tokens=max_new_tokens, temperature=0.0)
            ev = a.evidence or {"frames": []}
            top = index_of[ev["frames"][0]["stamp"]] if ev["frames"] else None
            dense = ev.get("frames_per_token") or []
            top_dense = index_of[dense[0]["stamp"]] if dense else None
            pred = asked_object(e.question) if e.kind == "past" else None
            rows.append({"seed": ep.seed, "kind": e.kind, "frame": e.frame, "template": e.template,
                         "question": e.question, "seen_frame": e.seen_frame, "held": held,
                         "answer_frame_held": e.seen_frame in held, "top": top,
                         "hit": top is not None and pred is not None and shows(ep.frames[top], pred),
                         "exact": top == e.seen_frame, "top_per_token": top_dense,
                         "hit_per_token": top_dense is not None and pred is not None
                         and shows(ep.frames[top_dense], pred),
                         "top_is_newest": top == f.index,
                         "chance": sum(shows(ep.frames[i], pred) for i in held) / len(held) if held and pred
                         else 0.0,
                         "frame_share": ev.get("frame_share"), "correct": world.normalize_answer(a.text)
                         == world.normalize_answer(e.answer)})
    return rows


def summary(rows: list[dict]) -> dict:
    cur = [r for r in rows if r.get("kind") == "current" and r["held"]]
    rows = [r for r in rows if r.get("kind", "past") == "past"]
    held = [r for r in rows if r["answer_frame_held"]]
    n = len(held)

    def mean(key):
        return round(sum(float(r[key]) for r in held) / n, 4) if n else None

    return {"questions": len(rows), "n": n, "hit_rate": mean("hit"), "chance": mean("chance"),
            "hit_rate_per_token": mean("hit_per_token"), "top_is_newest": mean("top_is_newest"),
            "exact_rate": mean("exact"), "exact_chance": round(sum(1 / len(r["held"]) for r in held) / n, 4)
            if n else None, "held_frames_mean": round(sum(len(r["held"]) for r in held) / n, 2) if n else None,
            "frame_share_mean": mean("frame_share"), "answer_accuracy": mean("correct"),
            "current_n": len(cur),
            "current_top_is_newest": _rate(cur, "top_is_newest"),
            "current_chance": round(sum(1 / len(r["held"]) for r in cur) / len(cur), 4) if cur else None,
            "current_answer_accuracy": _rate(cur, "correct")}


def _rate(rows: list[dict], key: str):
    return round(sum(float(r[key]) for r in rows) / len(rows), 4) if rows else None


def run(model, processor, seeds, n_frames: int, n_questions: int, budgets, spec_item: str, max_new_tokens: int,
        max_chunk: int = 256, log=print, n_current: int = 8) -> dict:
    from infmllm_ros.engine import StreamingSession

    spec = policies.saddle_spec(*policies.parse_saddle(spec_item))
    eps = [world.make_episode(int(s), n_frames, n_questions, kinds=("past",)) for s in seeds]
    eps += [world.make_episode(int(s), n_frames, n_current, kinds=("current",)) for s in seeds] if n_current else []
    out = {}
    for budget in budgets:
        session = StreamingSession(model, processor, cache=spec.cache_config(budget, max_chunk, max_new_tokens))
        t0, rows = time.perf_counter(), []
        for ep in eps:
            rows += run_episode(session, ep, max_new_tokens)
        out[str(budget)] = {**summary(rows), "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
        s = out[str(budget)]
        log(f"  budget {budget}: top evidence frame shows the asked object {s['hit_rate']} (chance {s['chance']}) "
            f"over {s['n']} questions with the answer frame held; exact frame {s['exact_rate']} "
            f"(chance {s['exact_chance']}); current questions: top = newest {s['current_top_is_newest']} "
            f"(chance {s['current_chance']}), {s['seconds']} s")
    return {"kind": "evidence", "seeds": [int(s) for s in seeds], "frames": n_frames,
            "questions_per_episode": n_questions, "current_questions_per_episode": n_current, "policy": spec.name,
            "spec": spec.describe(),
            "max_new_tokens": max_new_tokens, "budgets": out}


def markdown(res: dict) -> str:
    lines = ["### Evidence: the answer's top frame vs the asked object (`evidence`)\n",
             f"Model `{res['model']}`; held-out seeds {res['seeds']}, {res['frames']} frames and up to "
             f"{res['questions_per_episode']} past questions per episode; policy {res['policy']}; greedy; "
             f"{res['device']} {res['dtype']}; {common.describe_machine(res['machine'])}; commit {res['commit']}.\n",
             f"`{res['command']}`\n",
             "Counted: past questions whose answer frame the cache still held when asked. Hit = the top frame of "
             "`Answer.evidence` shows the asked object (95 % Wilson interval beside it; the target, a clear majority, "
             "is its whole interval above 50 %); chance = a frame drawn uniformly from the held frames. "
             "Exact = the top frame is the answer frame itself (chance 1 / held frames). Per token = the top frame "
             "of `evidence.frames_per_token` (mass divided by the frame's stored tokens). Newest = how often the top "
             "frame is the newest frame (past questions ask about things out of view there).\n"]
    rows = [[b, s["questions"], s["n"], s["held_frames_mean"], _pct(s["hit_rate"]), _ci(hit_interval(s)),
             _pct(s["hit_rate_per_token"]),
             _pct(s["chance"]), _pct(s["top_is_newest"]),
             _pct(s["exact_rate"]), _pct(s["exact_chance"]), _pct(s["frame_share_mean"]), _pct(s["answer_accuracy"]),
             s["seconds"]] for b, s in res["budgets"].items()]
    lines.append(common.md_table(["budget", "past questions", "answer frame held", "held frames (mean)",
                                  "top frame shows object", "95 % interval", "per token", "chance",
                                  "top = newest",
                                  "top = answer frame", "chance",
                                  "mass on frames", "answers right", "s"], rows))
    cur = [[b, s["current_n"], _pct(s["current_top_is_newest"]), _pct(s["current_chance"]),
            _pct(s["current_answer_accuracy"])]
           for b, s in res["budgets"].items() if s.get("current_n")]
    if cur:
        lines.append(f"\nCurrent-view questions (up to {res.get('current_questions_per_episode')} per episode, same "
                     "seeds, own episodes): the answer frame is the newest one.\n")
        lines.append(common.md_table(["budget", "current questions", "top = newest frame", "chance",
                                      "answers right"], cur))
    if res.get("note"):
        lines.append(f"\n{res['note']}\n")
    return "\n".join(lines) + "\n"


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.0f} %"


def _ci(ci) -> str:
    return "" if ci is None else f"{100 * ci[0]:.0f}-{100 * ci[1]:.0f} %"


def hit_interval(s: dict) -> tuple[float, float] | None:
    """95 % Wilson interval of a budget's hit rate (its hits are hit_rate x n, rounded as stored)."""
    return common.wilson(round(s["hit_rate"] * s["n"]), s["n"]) if s.get("n") else None


def clear_majority(s: dict) -> bool:
    """The issue's "clear majority": the whole 95 % interval of the hit rate lies above one half."""
    ci = hit_interval(s)
    return ci is not None and ci[0] > 0.5


def findings(name: str, res: dict) -> list[str]:
    return [f"`{name}`, budget {b}: the top evidence frame shows the asked object in {_pct(s['hit_rate'])} of "
            f"{s['n']} past questions with the answer frame held (95 % interval {_ci(hit_interval(s))}; per token "
            f"{_pct(s['hit_rate_per_token'])}; chance {_pct(s['chance'])}; top = newest frame "
            f"{_pct(s['top_is_newest'])}): target (clear majority: the interval above 50 %) "
            f"{'met' if clear_majority(s) else 'not met'}"
            + (f"; current-view questions: top = newest frame {_pct(s['current_top_is_newest'])} of "
               f"{s['current_n']} (chance {_pct(s['current_chance'])})" if s.get("current_n") else "") + "."
            for b, s in res["budgets"].items() if s["n"]]


def plot(res: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = list(res["budgets"])
    xs = range(len(names))
    for off, key, label in ((-0.4, "hit_rate", "top frame shows object"), (-0.2, "hit_rate_per_token", "per token"),
                            (0.0, "chance", "chance"), (0.2, "top_is_newest", "past questions: top = newest"),
                            (0.4, "current_top_is_newest", "current questions: top = newest")):
        ax.bar([x + off for x in xs], [100 * (res["budgets"][b].get(key) or 0) for b in names], 0.2, label=label)
    ax.set_xticks(list(xs), [f"budget {b}" for b in names])
    ax.set_ylabel("% of questions")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=6)
    common.save_figure(fig, path)


def _without_note(argv: list[str]) -> list[str]:
    """The command line to show: the note is shown as prose, not repeated in the command."""
    out, skip = [], False
    for x in argv:
        if skip or x == "--note" or x.startswith("--note="):
            skip = x == "--note"
            continue
        out.append(x)
    return out


def parse(argv):
    p = argparse.ArgumentParser(prog="infmllm-bench evidence", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help=f"local VLM folder (default: the embedded {DEFAULT_MODEL})")
    p.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS)
    p.add_argument("--frames", type=int, default=96)
    p.add_argument("--questions", type=int, default=16, help="past questions per episode")
    p.add_argument("--current-questions", type=int, default=8, help="current-view questions per (own) episode")
    p.add_argument("--note", default="", help="a paragraph shown under the tables (what was tried, caveats)")
    p.add_argument("--budgets", type=int, nargs="+", default=[128, 512])
    p.add_argument("--saddle", default=DEFAULT_SPEC, help="saddle bias:strength")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(common.DEFAULT_OUT))
    p.add_argument("--name", default="evidence")
    return p.parse_args(argv)


def main(argv=None, model=None, processor=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    m = common.machine()
    common.print_machine(m)
    name = a.model or str(DEFAULT_MODEL)
    if model is None:
        from infmllm_ros.engine import loading

        model, processor = loading.load(name, device="cpu", dtype=getattr(torch, a.dtype))
    res = run(model, processor, a.seeds, a.frames, a.questions, a.budgets, a.saddle, a.max_new_tokens,
              n_current=a.current_questions)
    res.update(model=name, device="cpu", dtype=a.dtype, machine=m, commit=common.git_commit(),
               command=common.command_line(["evidence", *_without_note(argv)]), note=a.note)
    return common.finish(a.out, a.name, res, markdown, plot)


if __name__ == "__main__":
    raise SystemExit(main())

"""infmllm-bench recall-archive: the frame archive + recall (memory/recall.py) vs the bounded policies, SimpleStream
and the full cache, on the recall bench's held-out episodes, at equal GPU bytes; 96- and 384-frame streams.

Arms (every one a real `StreamingSession`, greedy, the same episodes and questions as `infmllm-bench recall`):
- `saddle+archive`: saddle at budget B with `recall_frames` K: K x (frame chunk + 8) reserved slots = R.
- `saddle`, `streaming_llm`: at budget B (today's rows), and `@gpu` at budget B + R: the same K/V bytes as
  saddle+archive (capacity = budget + max_chunk + max_new_tokens + R either way).
- `simplestream`: SimpleStream-style: per question, a fresh context of the last F frames re-prefilled, F = what
  budget B + R holds (the same GPU bytes), then the question; no earlier conversation.
- `full`: never evicts (the stream's whole length; also beyond the model's trained positions).

Per question: accuracy by distance bucket and kind (`recall.tables`), recall's added latency (probe forward + page
reads + insertion, measured inside the session) and answer latency, disk bytes read; per arm the archive's bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path

import torch

from infmllm_ros import world
from infmllm_ros.bench import common, policies, recall
from infmllm_ros.bench.policies import PolicySpec
from infmllm_ros.memory.recall import HELD_FRACTION

DEFAULT_SEEDS = list(range(8))
DEFAULT_FRAMES = (96, 384)
DEFAULT_SADDLE = "linear:2"  # the best saddle row of `recall` (docs/BENCHMARKS.md)
POINTS = 10.0


class SimpleStream:
    """Keeps the last `keep` frames in RAM; each question re-prefills them into a fresh session context."""

    def __init__(self, session, keep: int):
        self.session, self.keep = session, keep
        self.frames: deque = deque(maxlen=keep)

    def reset(self):
        self.frames.clear()
        self.session.reset()

    def observe(self, rgb, stamp):
        self.frames.append((rgb, stamp))
        return 0

    def ask(self, question, **kw):
        t0 = time.perf_counter()
        self.session.reset()
        for rgb, stamp in self.frames:
            self.session.observe(rgb, stamp)
        a = self.session.ask(question, **kw)
        a.latency_s = time.perf_counter() - t0  # the re-prefill is this baseline's per-question cost
        return a

    def stats(self):
        return self.session.stats()


def arms(budget: int, recall_slots: int, frame_tokens: int, saddle: str, k: int, oracle: bool = False) -> list[dict]:
    sad = policies.saddle_spec(*policies.parse_saddle(saddle))
    slm = PolicySpec("streaming_llm", "streaming_llm", sinks=policies.DEFAULT_SINKS)
    gpu = budget + recall_slots
    return [
        dict(name="full", spec=recall.FULL, budget=None),
        dict(name="streaming_llm", spec=slm, budget=budget),
        dict(name="streaming_llm@gpu", spec=slm, budget=gpu),
        dict(name="simplestream", spec=PolicySpec("window", "streaming_llm", sinks=0), budget=gpu,
             keep=max(1, gpu // max(frame_tokens, 1) - 1)),  # -1: room for the system turn and the question
        dict(name=sad.name, spec=sad, budget=budget),
        dict(name=sad.name + "@gpu", spec=sad, budget=gpu),
        dict(name=sad.name + "+archive", spec=sad, budget=budget, recall_frames=k),
        dict(name=sad.name + "+archive[question]", spec=sad, budget=budget, recall_frames=k, placement="question"),
    ] + ([dict(name=sad.name + "+archive[oracle]", spec=sad, budget=budget, recall_frames=k, oracle=True)]
         if oracle else [])


def oracle_choice(recall_state, asked: dict):
    """A ranking that knows the answer: the frames the answer rests on, the one showing the answer first (for "after"
    the later frame where the next thing appeared), then the named object's, those archived and not held, at most
    recall_frames. The ceiling of any ranking: how much recalled evidence helps the model answer."""
    def choose(cache, queries, query_positions):
        frames = recall_state.archive.frames
        ids = [f for stamp in asked.get("stamps", ()) for f, e in frames.items() if e.stamp == stamp]
        if not ids:
            return []
        held = recall_state.held_fraction(cache, ids)
        return [f for f, h in zip(ids, held.tolist(), strict=True) if h < HELD_FRACTION][:recall_state.recall_frames]
    return choose


def stream(session, ep: world.Episode, name: str, max_new_tokens: int, asked: dict | None = None
           ) -> tuple[list[dict], dict]:
    by_frame = defaultdict(list)
    for e in ep.events:
        by_frame[e.frame].append(e)
    last = max((e.frame for e in ep.events), default=-1)
    session.reset()
    rows, archive_bytes = [], 0
    for f in ep.frames[:last + 1]:
        session.observe(f.rgb, recall.STAMP0 + f.t)
        for e in by_frame[f.index]:
            if asked is not None:  # the oracle arm's ranking reads the evidence frames' stamps
                shown = dict.fromkeys(f for f in (e.answer_frame, e.seen_frame) if f is not None)
                asked["stamps"] = [recall.STAMP0 + ep.frames[f].t for f in shown]
            a = session.ask(e.question, max_new_tokens=max_new_tokens, temperature=0.0)
            st = session.stats()
            rec = (st.get("recall") or {})
            last_recall = rec.get("last_recall") or {}
            archive_bytes = max(archive_bytes, (rec.get("archive") or {}).get("used_bytes", 0))
            rows.append(dict(policy=name, seed=ep.seed, frame=e.frame, kind=e.kind, template=e.template,
                             question=e.question, truth=e.answer, got=a.text, correct=recall.correct(a.text, e.answer),
                             distance=e.distance, bucket=recall.bucket(e.distance), latency_s=round(a.latency_s, 5),
                             recall_s=round(float(last_recall.get("seconds", 0.0)), 5),
                             recalled_frames=int(last_recall.get("frames", 0)),
                             bytes_read=int(last_recall.get("bytes_read", 0)),
                             hit=(recall.STAMP0 + ep.frames[e.seen_frame].t in last_recall.get("stamps", ()))
                             if e.seen_frame is not None else None,
                             kv_bytes=int(st.get("kv_bytes_budget") or st.get("kv_bytes") or 0)))
    return rows, dict(archive_bytes=archive_bytes)


def _hit_rate(rows, window_frames):
    """Share of past questions beyond the window whose evidence frame was among the recalled ones."""
    hits = [r["hit"] for r in rows if r["kind"] == "past" and r["distance"] is not None
            and r["distance"] > window_frames and r["hit"] is not None]
    return {"n": len(hits), "hits": sum(hits)} if hits else None


def _median(xs):
    return round(statistics.median(xs), 5) if xs else None


def run_length(model, processor, seeds, n_frames, n_questions, budget, k, saddle, max_new_tokens, max_chunk,
               full_max, archive_mb, log=print, only=None, oracle=False) -> dict:
    from infmllm_ros.engine import StreamingSession

    eps = [world.make_episode(int(s), n_frames, n_questions) for s in seeds]
    probe_spec = policies.saddle_spec(*policies.parse_saddle(saddle))
    probe = StreamingSession(model, processor, cache=probe_spec.cache_config(budget, max_chunk, max_new_tokens),
                             recall_frames=k)
    probe.reset()
    frame_tokens = int(probe.observe(eps[0].frames[0].rgb, recall.STAMP0))
    recall_slots = probe.cache_cfg.recall_slots
    del probe
    window_frames = budget // max(frame_tokens, 1)
    full_budget = max(recall.episode_tokens_bound(ep, frame_tokens, max_new_tokens) for ep in eps)
    per, records = {}, []
    for arm in arms(budget, recall_slots, frame_tokens, saddle, k, oracle):
        name, spec = arm["name"], arm["spec"]
        if only and name not in only:
            continue
        b = full_budget if arm["budget"] is None else arm["budget"]
        if arm["budget"] is None and b > full_max:
            per[name] = {"skipped": f"the stream needs a budget of {b} > --full-max {full_max}"}
            log(f"  {name}: skipped")
            continue
        cfg = spec.cache_config(b, max_chunk, max_new_tokens)
        with tempfile.TemporaryDirectory(prefix="bench_archive_") as folder:
            session = StreamingSession(model, processor, cache=cfg, recall_frames=arm.get("recall_frames", 0),
                                       archive_mb=archive_mb, archive_dir=folder,
                                       recall_placement=arm.get("placement", "past"))
            runner = SimpleStream(session, arm["keep"]) if "keep" in arm else session
            asked = {} if arm.get("oracle") else None
            if asked is not None:
                session.recall.choose = oracle_choice(session.recall, asked)
            t0, mine, archive_bytes = time.perf_counter(), [], 0
            for ep in eps:
                rows, extra = stream(runner, ep, name, max_new_tokens, asked)
                mine += rows
                archive_bytes = max(archive_bytes, extra["archive_bytes"])
            kv_bytes = session.kv_bytes
            del session, runner
        recalled = [r for r in mine if r["recalled_frames"]]
        entry = dict(spec=spec.describe(b), budget=b, kv_bytes=kv_bytes, seconds=round(time.perf_counter() - t0, 1),
                     recall_frames=arm.get("recall_frames", 0), keep_frames=arm.get("keep"),
                     placement=arm.get("placement", "past") if arm.get("recall_frames") else None,
                     hit_rate=_hit_rate(mine, window_frames),
                     latency_median_s=_median([r["latency_s"] for r in mine]),
                     recall_median_s=_median([r["recall_s"] for r in recalled]),
                     bytes_read_mean=round(sum(r["bytes_read"] for r in mine) / len(mine)) if mine else 0,
                     recalled_frames_mean=round(sum(r["recalled_frames"] for r in mine) / len(mine), 3) if mine else 0,
                     archive_bytes=archive_bytes, **recall.tables(mine, window_frames))
        per[name] = entry
        records += mine
        log(f"  {n_frames} frames {name}: past beyond {window_frames} frames {entry['past_beyond_window']['accuracy']}"
            f" (n={entry['past_beyond_window']['n']}), all {entry['overall']['accuracy']}, {entry['seconds']} s",
            flush=True)
    sad = policies.saddle_spec(*policies.parse_saddle(saddle)).name
    return dict(frames=n_frames, questions_per_episode=n_questions, n_questions=sum(len(e.events) for e in eps),
                frame_tokens=frame_tokens, window_frames=window_frames, full_budget=full_budget,
                recall_slots=recall_slots, policies=per, target=target(per, sad), records=records)


def target(per: dict, saddle_name: str) -> dict | None:
    """The issue's goal on past questions beyond the window: saddle+archive >= full and >= StreamingLLM + 10 points
    at the same GPU bytes (streaming_llm@gpu)."""
    arch = per.get(saddle_name + "+archive", {}).get("past_beyond_window")
    base = per.get("streaming_llm@gpu", {}).get("past_beyond_window")
    if not arch or not base or not arch["n"]:
        return None
    full = per.get("full", {}).get("past_beyond_window")
    out = dict(n=arch["n"], archive=arch["accuracy"], streaming_llm_gpu=base["accuracy"],
               delta_points=round(100 * (arch["accuracy"] - base["accuracy"]), 1),
               full=full["accuracy"] if full else None, target_points=POINTS)
    out["met"] = out["delta_points"] >= POINTS and (full is None or arch["accuracy"] >= full["accuracy"])
    return out


# ----------------------------------------------------------------------------------------------- output
def _acc(cell):
    return recall._acc(cell)


def markdown(res: dict) -> str:
    lines = ["### Long-term memory: frame archive + recall (`recall-archive`)\n",
             f"Model `{res['model']}`; held-out seeds {res['seeds']}; budget {res['budget']} tokens; saddle+archive "
             f"recalls {res['recall_frames']} frames per question; archive bound {res['archive_mb']} MiB; greedy, at "
             f"most {res['max_new_tokens']} new tokens; {res['device']} {res['dtype']}; "
             f"{common.describe_machine(res['machine'])}; commit {res['commit']}.\n",
             f"`{res['command']}`\n",
             "`@gpu` rows and `simplestream` get budget + the reserved recall slots: the same K/V bytes as "
             "saddle+archive. simplestream re-prefills its last frames for every question (fresh context). "
             "`+archive` places recalled frames before the held tokens (default), `[question]` right before the "
             "question, `[oracle]` recalls the frames the answer rests on (a ranking that knows the answer: the frame "
             "showing the answer, for `after` the later one, then the named object's). "
             "'evidence frame recalled': past questions beyond the window whose evidence frame was recalled.\n"]
    if res.get("note"):
        lines.append(f"Note: {res['note']}\n")
    for run in res["runs"]:
        w = run["window_frames"]
        lines.append(f"\n{run['frames']} frames per episode, {run['n_questions']} questions; a frame is "
                     f"{run['frame_tokens']} tokens (budget holds {w} frames); reserved recall slots "
                     f"{run['recall_slots']}; full cache budget {run['full_budget']}.\n")
        header = ["arm", "budget", "KV MiB", f"past > {w} frames", "past", "all", "latency median ms",
                  "recall median ms", "evidence frame recalled", "disk read / question KiB", "archive MiB", "s"]
        rows = []
        for name, e in run["policies"].items():
            if "skipped" in e:
                rows.append([name, f"skipped: {e['skipped']}"] + [""] * (len(header) - 2))
                continue
            rows.append([name, e["budget"], round(e["kv_bytes"] / 2**20, 3), _acc(e["past_beyond_window"]),
                         _acc(e["by_kind"]["past"]), _acc(e["overall"]),
                         round(1000 * e["latency_median_s"], 1) if e["latency_median_s"] is not None else "",
                         round(1000 * e["recall_median_s"], 1) if e["recall_median_s"] is not None else "",
                         f"{e['hit_rate']['hits']}/{e['hit_rate']['n']}" if e["recall_frames"] and e["hit_rate"]
                         else "",
                         round(e["bytes_read_mean"] / 1024, 1) if e["recall_frames"] else "",
                         round(e["archive_bytes"] / 2**20, 3) if e["recall_frames"] else "", e["seconds"]])
        lines.append(common.md_table(header, rows))
        lines += by_template(run)
        t = run.get("target")
        if t:
            full = f", full {100 * t['full']:.0f} %" if t["full"] is not None else ""
            lines.append(f"\nGoal (past questions beyond {w} frames, n={t['n']}: saddle+archive >= full and >= "
                         f"streaming_llm@gpu + {t['target_points']:g} points): {100 * t['archive']:.0f} % vs "
                         f"streaming_llm@gpu {100 * t['streaming_llm_gpu']:.0f} % ({t['delta_points']:+.1f} points)"
                         f"{full}: **{'met' if t['met'] else 'not met'}**.\n")
    return "\n".join(lines)


def by_template(run: dict) -> list[str]:
    """Past questions beyond the window, per question template and arm (from the per-question rows, when the json
    keeps them). `after` asks what appeared after the named object: its answer is in a later frame than the named
    object's, which is the frame the ranking looks for ([oracle] recalls the answer's frame first)."""
    cells = defaultdict(list)
    for r in run.get("records") or []:
        if r["kind"] == "past" and r["distance"] is not None and r["distance"] > run["window_frames"]:
            cells[(r["policy"], r["template"])].append(r["correct"])
    if not cells:
        return []
    arms, templates = list(dict.fromkeys(a for a, _ in cells)), sorted({t for _, t in cells})
    rows = [[a] + [f"{100 * sum(v) / len(v):.0f} % ({len(v)})" if (v := cells.get((a, t))) else "" for t in templates]
            for a in arms]
    return [f"\nPast questions beyond {run['window_frames']} frames by template (`after`: the answer is in a later "
            "frame than the named object's, which is the frame the ranking looks for):\n",
            common.md_table(["arm"] + templates, rows)]


def plot(res: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(res["runs"]), figsize=(5 * len(res["runs"]), 3.8), squeeze=False)
    for ax, run in zip(axes[0], res["runs"], strict=True):
        names = [n for n, e in run["policies"].items() if "skipped" not in e]
        vals = [100 * (run["policies"][n]["past_beyond_window"]["accuracy"] or 0) for n in names]
        ax.barh(range(len(names)), vals, color=["C3" if n.endswith("+archive") else "C0" for n in names])
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlim(0, 100)
        ax.set_xlabel(f"accuracy (%), past questions beyond {run['window_frames']} frames")
        ax.set_title(f"{run['frames']} frames, budget {res['budget']}")
    common.save_figure(fig, path)


def findings(name: str, res: dict) -> list[str]:
    out = []
    for run in res["runs"]:
        for arm, e in run["policies"].items():
            if arm.endswith("[oracle]") and "skipped" not in e:
                hit, beyond = e.get("hit_rate") or {}, e["past_beyond_window"]
                out.append(f"`{name}`, {run['frames']} frames: {arm} (recalls the frames the answer rests on; "
                           f"the named object's in {hit.get('hits', 0)}/{hit.get('n', 0)} past questions beyond the "
                           "window): "
                           f"{100 * beyond['accuracy']:.0f} % on them (n={beyond['n']}),"
                           f" {100 * e['overall']['accuracy']:.0f} % on all: the ceiling of the frame ranking.")
        t = run.get("target")
        if t:
            full = f", full {100 * t['full']:.0f} %" if t["full"] is not None else ""
            out.append(f"`{name}`, {run['frames']} frames: past beyond {run['window_frames']} frames (n={t['n']}): "
                       f"saddle+archive {100 * t['archive']:.0f} % vs streaming_llm at the same GPU bytes "
                       f"{100 * t['streaming_llm_gpu']:.0f} % ({t['delta_points']:+.1f} points){full}; goal "
                       f"{'met' if t['met'] else 'not met'}.")
    return out


# ----------------------------------------------------------------------------------------------- CLI
def parse(argv):
    p = argparse.ArgumentParser(prog="infmllm-bench recall-archive", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help=f"local VLM folder (default: the embedded {recall.DEFAULT_MODEL})")
    p.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS)
    p.add_argument("--frames", type=int, nargs="+", default=list(DEFAULT_FRAMES), help="stream lengths")
    p.add_argument("--questions-every", type=int, default=3, help="questions per episode = frames // this")
    p.add_argument("--max-questions", type=int, default=64, help="at most this many questions per episode")
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--recall-frames", type=int, default=1, help="frames recalled per question (1; 2 won on seeds "
                   "16-23 against the baselines at its bytes but not held out: docs/bench/recall_archive_k2.json)")
    p.add_argument("--archive-mb", type=float, default=256.0)
    p.add_argument("--saddle", default=DEFAULT_SADDLE, help="saddle bias:strength")
    p.add_argument("--arms", nargs="*", default=None, help="only these arms (names as in the table)")
    p.add_argument("--oracle", action="store_true",
                   help="add saddle+archive[oracle]: recall the frames the answer rests on")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--max-chunk", type=int, default=256)
    p.add_argument("--full-max", type=int, default=32768)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(common.DEFAULT_OUT))
    p.add_argument("--name", default="recall_archive")
    return p.parse_args(argv)


def main(argv=None, model=None, processor=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device, dtype = common.pick_device(a.device), getattr(torch, a.dtype)
    m = common.machine()
    common.print_machine(m)
    model_name = a.model or str(recall.DEFAULT_MODEL)
    if model is None:
        if not (Path(model_name) / "config.json").is_file():
            raise SystemExit(f"recall-archive: no model at {model_name}")
        from infmllm_ros.engine import loading

        model, processor = loading.load(model_name, device=device, dtype=dtype)
    else:
        model_name = a.model or f"in-memory {type(model).__name__}"
    runs = []
    for n in a.frames:
        q = max(1, min(a.max_questions, n // a.questions_every))
        print(f"recall-archive: {n} frames, {q} questions per episode, seeds {a.seeds}", flush=True)
        runs.append(run_length(model, processor, a.seeds, n, q, a.budget, a.recall_frames, a.saddle,
                               a.max_new_tokens, a.max_chunk, a.full_max, a.archive_mb, only=a.arms,
                               oracle=a.oracle))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res = dict(kind="recall_archive", model=model_name, seeds=[int(s) for s in a.seeds], budget=a.budget,
               recall_frames=a.recall_frames, archive_mb=a.archive_mb, saddle=a.saddle,
               max_new_tokens=a.max_new_tokens, device=str(device), dtype=a.dtype, machine=m,
               load_avg_1min_end=round(load, 2) if load is not None else None, commit=common.git_commit(),
               command=common.command_line(["recall-archive", *argv]), runs=runs)
    return common.finish(a.out, a.name, res, markdown, plot)


if __name__ == "__main__":
    raise SystemExit(main())

"""infmllm-bench recall: accuracy on held-out world episodes vs distance, per cache policy at equal budget.

Each held-out episode (`world.make_episode(seed, frames, questions)`, seeds never trained on) streams through a real
`StreamingSession` exactly as the node feeds it: every frame via `observe(rgb, stamp)` (epoch-like stamps; the
session counts time markers from the first frame since `reset()`), every question via `ask` right after its frame
(greedy), the answers staying in the conversation. An answer is right when `world.normalize_answer` of it equals that
of the truth: `train_vlm.evaluate`'s rule, which also puts action JSON in canonical form. Distance = frames between
the evidence about the named thing and the question (`Event.distance`), bucketed; results are split by question kind
(current / past / action). Policies run at the same budget (tokens stored per layer after each eviction): plain
window (streaming_llm, sinks 0), StreamingLLM, H2O and saddle with a small sweep of its bias; the full cache runs
with a budget that holds the whole stream (the no-eviction upper bound). `majority` = always the most common answer
of the question's template over the evaluated questions (the chance level to beat).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from infmllm_ros import world
from infmllm_ros.bench import common, policies
from infmllm_ros.bench.policies import PolicySpec

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "robot_vlm"  # = train_vlm.DEFAULT_OUT
BUCKETS = (("0", 0, 0), ("1-4", 1, 4), ("5-16", 5, 16), ("17-64", 17, 64), ("65+", 65, None))
NONE_BUCKET = "none"  # nothing was seen ("stop", a target never seen)
BUCKET_NAMES = [b[0] for b in BUCKETS] + [NONE_BUCKET]
DEFAULT_SADDLE = policies.DEFAULT_SADDLE_SWEEP  # the same sweep as `text`
DEFAULT_SEEDS = list(range(16))  # held out: train-vlm trains on seeds >= 1,000,000 (monitor: 500,000+)
FULL = PolicySpec("full", "full")
STAMP0 = 1_764_000_000.0  # header stamps are epoch seconds; the session makes time markers relative


def bucket(distance: int | None) -> str:
    if distance is None:
        return NONE_BUCKET
    for name, lo, hi in BUCKETS:
        if distance >= lo and (hi is None or distance <= hi):
            return name
    raise ValueError(f"negative distance {distance}")


def correct(got: str, truth: str) -> bool:
    """train_vlm.evaluate's scorer: exact match after normalize_answer (action JSON compared in canonical form)."""
    return world.normalize_answer(got) == world.normalize_answer(truth)


def valid_action(text: str) -> bool:
    """Whether an answer is an action of the vocabulary (the node rejects anything else: no motion)."""
    try:
        world.validate_action(text.strip())
        return True
    except ValueError:
        return False


@dataclass
class Record:
    policy: str
    seed: int
    frame: int
    kind: str
    template: str
    question: str
    truth: str
    got: str
    correct: bool
    distance: int | None
    bucket: str
    stored: int  # tokens stored right after the answer (budget + question chunk + answer at most)
    seen: int
    finish_reason: str
    latency_s: float
    valid_action: bool | None = None  # action questions: the answer parses as an action of the vocabulary


def policy_specs(saddle_sweep=DEFAULT_SADDLE, names=None, window: int = policies.DEFAULT_WINDOW) -> list[PolicySpec]:
    """full + the bounded policies of bench/policies (window, StreamingLLM, H2O, saddle sweep), optionally filtered."""
    specs = [FULL] + policies.bounded_policies(saddle_sweep, window)
    if names:
        unknown = set(names) - {s.name for s in specs}
        if unknown:
            raise SystemExit(f"recall: unknown policies {sorted(unknown)}; known: {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in names]
    return specs


def stored_of(stats: dict) -> tuple[int, int]:
    cache = stats.get("cache") or {}
    stored = stats.get("tokens_stored", cache.get("stored"))
    seen = stats.get("tokens_seen", cache.get("seen"))
    return int(stored), int(seen)


def stream_episode(session, ep: world.Episode, policy: str, max_new_tokens: int, stamp0: float = STAMP0):
    """One episode through a session as the node would feed it; returns (records, max stored after a frame)."""
    by_frame = defaultdict(list)
    for e in ep.events:
        by_frame[e.frame].append(e)
    last = max((e.frame for e in ep.events), default=-1)
    session.reset()
    records, max_after_frame = [], 0
    for f in ep.frames[:last + 1]:
        session.observe(f.rgb, stamp0 + f.t)
        max_after_frame = max(max_after_frame, stored_of(session.stats())[0])
        for e in by_frame[f.index]:
            a = session.ask(e.question, max_new_tokens=max_new_tokens, temperature=0.0)
            stored, seen = stored_of(session.stats())
            records.append(Record(policy, ep.seed, e.frame, e.kind, e.template, e.question, e.answer, a.text,
                                  correct(a.text, e.answer), e.distance, bucket(e.distance), stored, seen,
                                  getattr(a, "finish_reason", ""), round(float(getattr(a, "latency_s", 0.0)), 4),
                                  valid_action(a.text) if e.kind == "action" else None))
    return records, max_after_frame


def _cell(rows) -> dict:
    n, c = len(rows), sum(r["correct"] for r in rows)
    return {"n": n, "correct": c, "accuracy": round(c / n, 4) if n else None}


def tables(rows: list[dict], window_frames: int) -> dict:
    """Accuracy overall, per distance bucket, per kind, per kind x bucket, and on past questions beyond the window."""
    out = {"overall": _cell(rows), "by_bucket": {b: _cell([r for r in rows if r["bucket"] == b]) for b in BUCKET_NAMES},
           "by_kind": {k: _cell([r for r in rows if r["kind"] == k]) for k in world.KINDS},
           "by_kind_bucket": {k: {b: _cell([r for r in rows if r["kind"] == k and r["bucket"] == b])
                                  for b in BUCKET_NAMES} for k in world.KINDS}}
    actions = [r for r in rows if r["kind"] == "action"]
    out["valid_actions"] = round(sum(bool(r.get("valid_action")) for r in actions) / len(actions), 4) if actions \
        else None
    out["past_beyond_window"] = _cell([r for r in rows if r["kind"] == "past" and r["distance"] is not None
                                       and r["distance"] > window_frames])
    return out


def majority_rows(rows: list[dict]) -> list[dict]:
    """The same questions answered with the most common answer of their template (chance level)."""
    counts = defaultdict(Counter)
    for r in rows:
        counts[r["template"]][world.normalize_answer(r["truth"])] += 1
    common_answer = {t: c.most_common(1)[0][0] for t, c in counts.items()}
    return [{**r, "correct": world.normalize_answer(r["truth"]) == common_answer[r["template"]],
             "valid_action": True if r["kind"] == "action" else None} for r in rows]


def episode_tokens_bound(ep: world.Episode, frame_tokens: int, max_new_tokens: int, question_tokens: int = 64) -> int:
    """Upper bound of the tokens one episode feeds (the full cache's budget: it must never need to evict)."""
    last = max((e.frame for e in ep.events), default=-1)
    return 64 + (last + 1) * (frame_tokens + 8) + len(ep.events) * (question_tokens + max_new_tokens + 8)


SessionFactory = Callable[[PolicySpec, object], object]  # (spec, CacheConfig) -> session (observe/ask/reset/stats)


def session_factory_for(model, processor) -> SessionFactory:
    from infmllm_ros.engine import StreamingSession

    def make(spec: PolicySpec, cache):
        return StreamingSession(model, processor, cache=cache)

    return make


def run(factory: SessionFactory, seeds, n_frames: int, n_questions: int, budget: int, specs: list[PolicySpec],
        max_new_tokens: int = 40, max_chunk: int = 256, full_max: int = 16384, log=print) -> dict:
    """Every policy over the same episodes; returns the results dict (records + tables)."""
    eps = [world.make_episode(int(s), n_frames, n_questions) for s in seeds]
    probe_spec = next((s for s in specs if s.policy != "full"), policies.bounded_policies(())[0])
    probe = factory(probe_spec, probe_spec.cache_config(budget, max_chunk, max_new_tokens))
    probe.reset()
    frame_tokens = int(probe.observe(eps[0].frames[0].rgb, STAMP0))
    del probe
    window_frames = budget // max(frame_tokens, 1)
    full_budget = max(episode_tokens_bound(ep, frame_tokens, max_new_tokens) for ep in eps)
    records, per_policy = [], {}
    for spec in specs:
        b = full_budget if spec.policy == "full" else budget
        entry = {"spec": spec.describe(b), "budget": b}
        if spec.policy == "full" and full_budget > full_max:
            entry["skipped"] = f"the stream needs a budget of {full_budget} > --full-max {full_max}"
            per_policy[spec.name] = entry
            log(f"  {spec.name}: skipped ({entry['skipped']})")
            continue
        cfg = spec.cache_config(b, max_chunk, max_new_tokens)
        session = factory(spec, cfg)
        t0, mine, max_after_frame = time.perf_counter(), [], 0
        for ep in eps:
            recs, m = stream_episode(session, ep, spec.name, max_new_tokens)
            mine += [asdict(r) for r in recs]
            max_after_frame = max(max_after_frame, m)
        entry.update(seconds=round(time.perf_counter() - t0, 1), capacity=cfg.capacity, max_chunk=cfg.max_chunk,
                     max_new_tokens=cfg.max_new_tokens, max_stored_after_frame=max_after_frame,
                     max_stored_at_ask=max((r["stored"] for r in mine), default=0), **tables(mine, window_frames))
        per_policy[spec.name] = entry
        records += mine
        log(f"  {spec.name}: accuracy {entry['overall']['accuracy']} over {entry['overall']['n']} questions, past "
            f"beyond {window_frames} frames {entry['past_beyond_window']['accuracy']} "
            f"(n={entry['past_beyond_window']['n']}), {entry['seconds']} s")
    first = next((n for n, e in per_policy.items() if "skipped" not in e), None)
    majority = tables(majority_rows([r for r in records if r["policy"] == first]), window_frames) if first else None
    return {"seeds": [int(s) for s in seeds], "frames": n_frames, "questions_per_episode": n_questions,
            "n_questions": sum(len(ep.events) for ep in eps), "budget": budget, "full_budget": full_budget,
            "frame_tokens": frame_tokens, "window_frames": window_frames, "max_new_tokens": max_new_tokens,
            "buckets": BUCKET_NAMES, "kinds": list(world.KINDS), "policies": per_policy, "majority": majority,
            "target": target(per_policy, records, window_frames), "records": records}


def target(per_policy: dict, records: list[dict] | None = None, window_frames: int = 0,
           points: float = 10.0) -> dict | None:
    """The issue's target: best saddle vs StreamingLLM on past questions beyond the window, in accuracy points; with
    the records, also the paired counts (questions only the saddle got right / only StreamingLLM got right)."""
    base = per_policy.get("streaming_llm", {}).get("past_beyond_window", {})
    saddles = {n: e["past_beyond_window"] for n, e in per_policy.items()
               if n.startswith("saddle") and "skipped" not in e and e["past_beyond_window"]["n"]}
    if not base.get("n") or not saddles:
        return None
    name = max(saddles, key=lambda n: saddles[n]["accuracy"])
    delta = round(100 * (saddles[name]["accuracy"] - base["accuracy"]), 1)
    out = {"n": base["n"], "streaming_llm": base["accuracy"], "best_saddle": name,
           "best_saddle_accuracy": saddles[name]["accuracy"], "delta_points": delta, "target_points": points,
           "met": delta >= points}
    if records:
        def beyond(policy):
            return [r["correct"] for r in records if r["policy"] == policy and r["kind"] == "past"
                    and r["distance"] is not None and r["distance"] > window_frames]

        pairs = list(zip(beyond(name), beyond("streaming_llm"), strict=True))
        out["only_saddle_right"] = sum(a and not b for a, b in pairs)
        out["only_streaming_llm_right"] = sum(b and not a for a, b in pairs)
    return out


# ----------------------------------------------------------------------------------------------- output


def _acc(cell: dict | None) -> str:
    if not cell or not cell["n"]:
        return ""
    return f"{100 * cell['accuracy']:.0f} % ({cell['n']})"


def markdown(res: dict) -> str:
    trained = (res.get("model_info") or {}).get("trained_max_frames")
    lines = ["### Recall vs distance (`recall`)\n",
             f"Model `{res['model']}`; held-out seeds {res['seeds']}, {res['frames']} frames and up to "
             f"{res['questions_per_episode']} questions per episode ({res['n_questions']} questions); budget "
             f"{res['budget']} tokens (a frame is {res['frame_tokens']} tokens: the budget holds "
             f"{res['window_frames']} frames), full cache budget {res['full_budget']}; greedy, at most "
             f"{res['max_new_tokens']} new tokens; saddle retrieval window "
             f"{'whole chunk' if not res.get('retrieval_window', 32) else res.get('retrieval_window', 32)}; "
             f"{res['device']} {res['dtype']}; {common.describe_machine(res['machine'])}; commit {res['commit']}.\n",
             f"`{res['command']}`\n",
             f"The full cache never evicts: its positions run up to {res['full_budget']} tokens"
             + (f" (the model trained on streams of at most {trained} frames)" if trained else "") + ".\n",
             "Accuracy (number of questions) per distance bucket (frames between seeing the thing and the question; "
             "none = nothing seen):\n"]
    rows_for = list(res["policies"].items()) + ([("majority", res["majority"])] if res["majority"] else [])
    header = ["policy", "all", *res["buckets"], *res["kinds"], f"past > {res['window_frames']} frames",
              "valid action JSON", "s"]
    rows = []
    for name, e in rows_for:
        if "skipped" in e:
            rows.append([name, f"skipped: {e['skipped']}"] + [""] * (len(header) - 2))
            continue
        rows.append([name, _acc(e["overall"]), *[_acc(e["by_bucket"][b]) for b in res["buckets"]],
                     *[_acc(e["by_kind"][k]) for k in res["kinds"]], _acc(e["past_beyond_window"]),
                     "" if e.get("valid_actions") is None else f"{100 * e['valid_actions']:.0f} %", e.get("seconds")])
    lines.append(common.md_table(header, rows))
    for kind in res["kinds"]:
        rows = [[name, *[_acc(e["by_kind_bucket"][kind][b]) for b in res["buckets"]]]
                for name, e in rows_for if "skipped" not in e]
        lines.append(f"\n{kind.capitalize()} questions per distance bucket:\n\n"
                     + common.md_table(["policy", *res["buckets"]], rows))
    t = res.get("target")
    if t:
        lines.append(f"\nTarget (saddle >= StreamingLLM + {t['target_points']:g} points on past questions beyond "
                     f"{res['window_frames']} frames, n={t['n']}): best {t['best_saddle']} "
                     f"{100 * t['best_saddle_accuracy']:.0f} % vs streaming_llm {100 * t['streaming_llm']:.0f} % "
                     f"({t['delta_points']:+.1f} points): **{'met' if t['met'] else 'not met'}**"
                     + (f"; paired: {t['only_saddle_right']} questions only the saddle got right, "
                        f"{t['only_streaming_llm_right']} only streaming_llm" if "only_saddle_right" in t else "")
                     + ".\n")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, kind in zip(axes, (None, "past"), strict=True):
        for name, e in list(res["policies"].items()) + [("majority", res["majority"])]:
            if not e or "skipped" in e:
                continue
            cells = e["by_bucket"] if kind is None else e["by_kind_bucket"][kind]
            xs = [i for i, b in enumerate(res["buckets"]) if cells[b]["n"]]
            ax.plot(xs, [100 * cells[res["buckets"][i]]["accuracy"] for i in xs], marker="o", label=name,
                    ls="--" if name == "majority" else "-", color="grey" if name == "majority" else None)
        ax.set_xticks(range(len(res["buckets"])), res["buckets"])
        ax.set_xlabel("distance (frames since the thing was seen)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(("all questions" if kind is None else f"{kind} questions") + f", budget {res['budget']}")
        ax.legend(fontsize=6)
    common.save_figure(fig, path)


def findings(name: str, res: dict) -> list[str]:
    """One-line statements for docs/BENCHMARKS.md, computed from the numbers."""
    ok = {n: e for n, e in res["policies"].items() if "skipped" not in e}
    parts = [f"{n} {100 * e['overall']['accuracy']:.0f} %" for n, e in ok.items() if e["overall"]["n"]]
    out = [f"`{name}`: accuracy over {res['n_questions']} held-out questions at budget {res['budget']}: "
           + ", ".join(parts) + (f" (majority {100 * res['majority']['overall']['accuracy']:.0f} %)."
                                 if res.get("majority") else ".")]
    t = res.get("target")
    if t:
        out.append(f"`{name}`: past questions beyond {res['window_frames']} frames (n={t['n']}): best "
                   f"{t['best_saddle']} {100 * t['best_saddle_accuracy']:.0f} % vs streaming_llm "
                   f"{100 * t['streaming_llm']:.0f} % ({t['delta_points']:+.1f} points; target "
                   f"+{t['target_points']:g}: {'met' if t['met'] else 'not met'}).")
    return out


# ----------------------------------------------------------------------------------------------- CLI


def model_info(model, path: str | None = None) -> dict:
    info = {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    record = Path(path) / "train_record.json" if path else None
    if record is not None and record.is_file():  # written by train-vlm: the longest stream it trained on
        import json

        info["trained_max_frames"] = json.loads(record.read_text()).get("config", {}).get("max_frames")
    return info


def parse(argv):
    p = argparse.ArgumentParser(prog="infmllm-bench recall", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help=f"local VLM folder (default: the embedded {DEFAULT_MODEL})")
    p.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS, help="held-out world seeds (default 0..15)")
    p.add_argument("--frames", type=int, default=96, help="frames per episode")
    p.add_argument("--questions", type=int, default=None, help="questions per episode (default frames // 3)")
    p.add_argument("--budget", type=int, default=128, help="tokens stored per layer after each eviction")
    p.add_argument("--policies", nargs="*", default=None, help="only these policy names")
    p.add_argument("--saddle", nargs="*", default=list(DEFAULT_SADDLE), help="saddle bias:strength items")
    p.add_argument("--window", type=int, default=policies.DEFAULT_WINDOW,
                   help="saddle retrieval window: 0 = every query of the chunk votes, N = its last N queries")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--max-chunk", type=int, default=256)
    p.add_argument("--full-max", type=int, default=16384, help="skip the full cache above this budget")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(common.DEFAULT_OUT))
    p.add_argument("--name", default="recall", help="results file stem")
    return p.parse_args(argv)


def main(argv=None, session_factory: SessionFactory | None = None, model=None, processor=None):
    """CLI; tests inject `session_factory` (spec, CacheConfig) -> session, or an in-memory model + processor."""
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = common.pick_device(a.device)
    dtype = getattr(torch, a.dtype)
    m = common.machine()
    common.print_machine(m)
    model_name, model_path = a.model or str(DEFAULT_MODEL), None
    if session_factory is None:
        if model is None:
            if not (Path(model_name) / "config.json").is_file():
                raise SystemExit(f"recall: no model at {model_name}" + (
                    "" if a.model else ": the embedded robot VLM is not trained yet; run `infmllm-bench train-vlm` "
                    "or pass --model"))
            from infmllm_ros.engine import loading

            model, processor = loading.load(model_name, device=device, dtype=dtype)
            model_path = model_name
        else:
            model_name = a.model or f"in-memory {type(model).__name__}"
        session_factory = session_factory_for(model, processor)
    else:
        model_name = a.model or "injected session factory"
    specs = policy_specs(a.saddle, a.policies, a.window)
    questions = a.questions if a.questions is not None else max(1, a.frames // 3)
    print(f"recall: seeds {a.seeds}, {a.frames} frames, {questions} questions per episode, budget {a.budget}, "
          f"policies {[s.name for s in specs]}, model {model_name}", flush=True)
    res = run(session_factory, a.seeds, a.frames, questions, a.budget, specs, a.max_new_tokens, a.max_chunk,
              a.full_max)
    res.update(retrieval_window=a.window)
    res.update(kind="recall", model=model_name, model_info=model_info(model, model_path) if model is not None else None,
               device=str(device), dtype=a.dtype, machine=m, commit=common.git_commit(),
               command=common.command_line(["recall", *argv]))
    return common.finish(a.out, a.name, res, markdown, plot)


if __name__ == "__main__":
    raise SystemExit(main())

"""infmllm-bench text: streaming perplexity of every cache policy on held-out text, against the recompute reference.

The held-out text (the last 10 % of the KJV, never trained on) is fed as one stream `[<s>] + tokens`, chunk by
chunk like a real stream: each chunk goes through the bounded cache in one forward, the chunk's tokens are scored
from that forward's logits (logit i predicts token i + 1), then `end_chunk()` evicts. Policies at equal budgets:
window without sinks, StreamingLLM, H2O, saddle (a sweep of bias forms and strengths), plus the full cache with
absolute positions (no budget; shows the collapse beyond the trained context). The reference is a sliding window
recomputed from scratch at every chunk (stride = chunk): `[<s>] + the last budget - 1 tokens + the chunk`, positions
from 0: the best a window of that budget can do. Every policy is reported as a ratio to it at the same budget.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from infmllm_ros.bench import common, corpus, metrics, policies
from infmllm_ros.bench.policies import FULL_ABSOLUTE, REFERENCE, PolicySpec


def load_model(path, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def start_token(tokenizer) -> int | None:
    return getattr(tokenizer, "bos_token_id", None)


def stream_ids(tokenizer, n_tokens: int, text: bytes) -> torch.Tensor:
    """[<s>] + the first n_tokens tokens of text (1-D); fails clearly when the text is too short."""
    ids = tokenizer(text.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(f"held-out text has only {len(ids)} tokens, {n_tokens} asked")
    bos = start_token(tokenizer)
    return torch.tensor(([bos] if bos is not None else []) + ids[:n_tokens], dtype=torch.long)


def score(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of targets (q,) under logits (q, V), in fp32."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.inference_mode()
def policy_nll(model, ids: torch.Tensor, spec: PolicySpec, budget: int, chunk: int) -> np.ndarray:
    """NLL of ids[1:] streamed through a fresh cache of `spec` at `budget`, chunk by chunk."""
    device, dtype = ids.device, next(model.parameters()).dtype
    policies.prepare(model)
    cache = policies.make_cache(spec, model, budget, chunk, device, dtype)
    n = len(ids)
    out = []
    for s in range(0, n - 1, chunk):
        x = ids[s:min(s + chunk, n - 1)]
        logits = policies.feed_chunk(model, cache, x.unsqueeze(0))[0]
        out.append(score(logits, ids[s + 1:s + 1 + len(x)]))
    return torch.cat(out).cpu().numpy()


def reference_window(ids: torch.Tensor, s: int, e: int, budget: int, has_start: bool) -> torch.Tensor:
    """The recompute input for chunk ids[s:e]: start token + the last budget - 1 tokens before s + the chunk."""
    if has_start:
        lo = s - (budget - 1)
        return ids[:e] if lo <= 1 else torch.cat([ids[:1], ids[lo:e]])
    return ids[max(0, s - budget):e]


@torch.inference_mode()
def reference_nll(model, ids: torch.Tensor, budget: int, chunk: int, has_start: bool) -> np.ndarray:
    """Sliding window recomputed from scratch at every chunk (no cache), positions from 0."""
    n = len(ids)
    out = []
    for s in range(0, n - 1, chunk):
        e = min(s + chunk, n - 1)
        x = reference_window(ids, s, e, budget, has_start)
        logits = model(input_ids=x.unsqueeze(0), use_cache=False).logits[0, -(e - s):]
        out.append(score(logits, ids[s + 1:e + 1]))
    return torch.cat(out).cpu().numpy()


def model_info(model) -> dict:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}


def timed(fn, *a):
    t = time.perf_counter()
    r = fn(*a)
    return r, time.perf_counter() - t


def run(model, ids: torch.Tensor, budgets, chunk: int, saddle_sweep=policies.DEFAULT_SADDLE_SWEEP,
        full_tokens: int = 0, window_tokens: int = 0, has_start: bool = True, log=print,
        retrieval_window: int = policies.DEFAULT_WINDOW) -> dict:
    """Every policy at every budget on the stream `ids`; returns the results dict (rows of metrics.Summary)."""
    n_pred = len(ids) - 1
    window = window_tokens or max(16, n_pred // 16)
    skipped_reason = policies.cache_available()
    rows, refs = [], {}
    for budget in budgets:
        ref, sec = timed(reference_nll, model, ids, budget, chunk, has_start)
        refs[budget] = ref
        rows.append({**metrics.summarize(REFERENCE.name, budget, ref, window, ref, sec).as_dict(),
                     "spec": REFERENCE.describe()})
        log(f"  B={budget} {REFERENCE.name}: ppl {rows[-1]['ppl']:.4f} ({sec:.1f}s)")
        for spec in policies.bounded_policies(saddle_sweep, retrieval_window):
            if skipped_reason:
                rows.append({"policy": spec.name, "budget": budget, "skipped": skipped_reason,
                             "spec": spec.describe(budget)})
                continue
            nll, sec = timed(policy_nll, model, ids, spec, budget, chunk)
            rows.append({**metrics.summarize(spec.name, budget, nll, window, ref, sec).as_dict(),
                         "spec": spec.describe(budget)})
            r = rows[-1]
            log(f"  B={budget} {spec.name}: ppl {r['ppl']:.4f} x{r['ratio_to_reference']:.4f} ({sec:.1f}s)"
                + ("  > 5% above reference" if r["flagged"] else ""))
    # the full cache has no budget: one run over a prefix, compared with every budget's reference on that prefix
    f_tokens = min(full_tokens or n_pred, n_pred)
    f_window = window_tokens if window_tokens and window_tokens * 4 <= f_tokens else max(16, f_tokens // 16)
    full_nll, sec = timed(policy_nll, model, ids[:f_tokens + 1], FULL_ABSOLUTE, f_tokens + 1, chunk)
    full_rows = [{**metrics.summarize(FULL_ABSOLUTE.name, b, full_nll, f_window, refs[b], sec).as_dict(),
                  "spec": FULL_ABSOLUTE.describe(), "backend": "DynamicCache" if skipped_reason else "BoundedCache"}
                 for b in budgets]
    log(f"  full_absolute over {f_tokens} tokens: ppl {full_rows[0]['ppl']:.4f} "
        f"x{full_rows[-1]['ratio_to_reference']:.3f} vs B={budgets[-1]}, "
        f"collapse detected: {full_rows[-1]['collapsed']} ({sec:.1f}s)")
    return {"tokens": n_pred, "chunk": chunk, "budgets": list(budgets), "window_tokens": window,
            "full_tokens": f_tokens, "full_window_tokens": f_window, "saddle_sweep": list(saddle_sweep),
            "retrieval_window": retrieval_window,
            "cache_backend": "DynamicCache (full only)" if skipped_reason else "infmllm_ros.cache.BoundedCache",
            "skipped": skipped_reason, "rows": rows + full_rows}


def beyond_context(res: dict) -> list[int]:
    """Budgets whose window (budget + chunk) passes the model's trained/max positions."""
    limit = res["model_info"].get("max_position_embeddings")
    return [b for b in res["budgets"] if limit and b + res["chunk"] > limit]


def _window_text(w) -> str:
    return "whole chunk" if not w else f"last {w} queries"


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["### Streaming perplexity (`text`)\n",
             f"Model `{res['model']}` ({res['model_info']['parameters'] / 1e6:.2f}M parameters, trained/max positions "
             f"{res['model_info']['max_position_embeddings']}), {res['tokens']} held-out tokens, chunk {res['chunk']}, "
             f"saddle retrieval window {_window_text(res.get('retrieval_window', 32))}, "
             f"windows of {res['window_tokens']} tokens; {res['device']} {res['dtype']}; "
             f"{common.describe_machine(m)}; commit {res['commit']}.\n",
             f"`{res['command']}`\n"]
    if res.get("skipped"):
        lines.append(f"**Skipped policies**: {res['skipped']}.\n")
    over = beyond_context(res)
    if over:
        lines.append(f"**Note**: at budget {', '.join(map(str, over))} a chunk's last query sees budget + chunk = "
                     f"{over[0] + res['chunk']}+ positions, more than the model's "
                     f"{res['model_info']['max_position_embeddings']}: the reference and every policy then run past "
                     f"the trained context too (keep budget + chunk <= trained context for a clean comparison).\n")
    header = ["policy", "PPL", "x reference", "first window", "last window", "last/first", "> 5 %", "collapse", "s"]
    for budget in res["budgets"]:
        rows = []
        for r in res["rows"]:
            if r["budget"] != budget:
                continue
            if "skipped" in r:
                rows.append([r["policy"], "skipped", "", "", "", "", "", "", ""])
                continue
            name = r["policy"] + (f" (first {r['tokens']} tokens)" if r["policy"] == FULL_ABSOLUTE.name else "")
            rows.append([name, r["ppl"], r["ratio_to_reference"], r["windows"][0], r["windows"][-1],
                         r["last_over_first"], "**yes**" if r["flagged"] else "no",
                         "**yes**" if r["collapsed"] else "no", round(r["seconds"], 1)])
        lines.append(f"\nBudget {budget}:\n\n" + common.md_table(header, rows))
    sweep = [r for r in res["rows"] if r["policy"].startswith("saddle[") and "skipped" not in r]
    if sweep:
        names = list(dict.fromkeys(r["policy"] for r in sweep))
        table = [[n] + [next((r["ratio_to_reference"] for r in sweep if r["policy"] == n and r["budget"] == b), None)
                        for b in res["budgets"]] for n in names]
        lines.append("\nSaddle bias sweep, PPL as a ratio to the reference:\n\n"
                     + common.md_table(["saddle[bias,strength]"] + [f"B={b}" for b in res["budgets"]], table))
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    plt = common.pyplot()
    budgets = res["budgets"]
    fig, axes = plt.subplots(1, len(budgets) + 1, figsize=(4.2 * (len(budgets) + 1), 3.6), squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=False):
        for r in res["rows"]:
            if r["budget"] != budget or "skipped" in r or r["policy"] == FULL_ABSOLUTE.name:
                continue
            x = [(i + 1) * res["window_tokens"] for i in range(len(r["window_ratios"]))]
            ax.plot(x, r["window_ratios"], marker=".", label=r["policy"])
        ax.axhline(metrics.FLAG_RATIO, color="grey", ls="--", lw=0.8)
        ax.set_title(f"budget {budget}")
        ax.set_xlabel("stream tokens")
        ax.set_ylabel("PPL / reference, per window")
        ax.legend(fontsize=6)
    ax = axes[0][-1]
    for r in res["rows"]:
        if r["policy"] == FULL_ABSOLUTE.name:
            x = [(i + 1) * res["full_window_tokens"] for i in range(len(r["window_ratios"]))]
            ax.plot(x, r["window_ratios"], marker=".", label=f"vs reference B={r['budget']}")
    ax.set_yscale("log")
    ax.set_title("full cache, absolute positions")
    ax.set_xlabel("stream tokens")
    ax.legend(fontsize=6)
    common.save_figure(fig, path)


def parse(argv):
    p = argparse.ArgumentParser(prog="infmllm-bench text", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(common.ASSET_MODEL), help="HF causal LM folder or id (default: in-house)")
    p.add_argument("--tokens", type=int, default=65536, help="held-out tokens streamed")
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--saddle", nargs="*", default=list(policies.DEFAULT_SADDLE_SWEEP), help="bias:strength items")
    p.add_argument("--full-tokens", type=int, default=16384,
                   help="the full cache runs over this prefix only (its cost is quadratic); 0 = the whole stream")
    p.add_argument("--window", type=int, default=policies.DEFAULT_WINDOW,
                   help="saddle retrieval window: 0 = every query of the chunk votes, N = its last N queries")
    p.add_argument("--window-tokens", type=int, default=0, help="tokens per reported window (default tokens/16)")
    p.add_argument("--text", default=None, help="a text file instead of the KJV (its last 10 %% is streamed)")
    p.add_argument("--data-dir", default=str(corpus.DATA_DIR))
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", help="auto = float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(common.DEFAULT_OUT))
    p.add_argument("--name", default="text_ppl", help="results file stem")
    return p.parse_args(argv)


def resolve_dtype(name: str, device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    m = common.machine()
    common.print_machine(m)
    if not Path(args.model).exists() and Path(args.model) == common.ASSET_MODEL:
        raise SystemExit(f"no model at {args.model}: run `infmllm-bench train-lm` first, or pass --model")
    model, tok = load_model(args.model, device, dtype)
    ids = stream_ids(tok, args.tokens, corpus.split(corpus.load_text(args.text, args.data_dir)).held_out).to(device)
    has_start = start_token(tok) is not None
    print(f"text: {args.tokens} held-out tokens, budgets {args.budgets}, chunk {args.chunk}, model {args.model}")
    res = run(model, ids, args.budgets, args.chunk, args.saddle, args.full_tokens, args.window_tokens, has_start,
              retrieval_window=args.window)
    res.update(kind="text_ppl", model=str(args.model), model_info=model_info(model), device=str(device),
               dtype=str(dtype).replace("torch.", ""), start_token=start_token(tok), machine=m,
               commit=common.git_commit(), command=common.command_line(["text", *argv]),
               text=args.text or "KJV held-out (last 10 %)", flag_ratio=metrics.FLAG_RATIO,
               collapse_ratio=metrics.COLLAPSE_RATIO)
    paths = common.write_results(args.out, args.name, res, markdown(res))
    plot(res, Path(args.out) / f"{args.name}.png")
    print(f"wrote {paths['json']}")
    return 0

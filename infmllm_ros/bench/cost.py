"""infmllm-bench cost: per-chunk latency, KV bytes and peak memory vs stream length, every policy.

One stream of token ids per policy, fed chunk by chunk through the cache exactly as in `text`; at every checkpoint
length the mean latency of the chunks just before it, the K/V bytes stored (stored tokens x bytes per token) and
allocated (the cache's buffers), and the memory so far: peak RSS of the process (getrusage) or CUDA
max_memory_allocated. By default each policy runs in its own process, so the peaks are that policy's alone;
--in-process feeds every chunk to every policy in turn (as cache_cost does: fairer latencies on a loaded machine,
but the memory peaks then accumulate). The full cache is quadratic in time: it runs only up to --full-max tokens.
Ratios are against StreamingLLM in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from infmllm_ros.bench import common, policies
from infmllm_ros.bench.policies import FULL_ABSOLUTE, PolicySpec

CPU_LENGTHS = [4096, 16384, 65536, 262144]
GPU_LENGTHS = [4096, 16384, 65536, 262144, 1048576]
TIMED_CHUNKS = 16  # latency = median over the last chunks before each checkpoint


def cost_policies() -> list[PolicySpec]:
    by_name = {s.name: s for s in policies.bounded_policies(("linear:1",))}
    return [FULL_ABSOLUTE, by_name["streaming_llm"], by_name["h2o"], by_name["saddle[linear,1]"]]


def load_or_build(model_path: str | None, device, dtype):
    """The model to time: a folder/id, else the in-house model if trained, else a random one of its shape."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    path = model_path or (str(common.ASSET_MODEL) if common.ASSET_MODEL.exists() else None)
    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval(), path
    from infmllm_ros.bench.train_lm import TrainConfig, model_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(TrainConfig())).to(device=device, dtype=dtype).eval()
    return model, "random (train-lm shape)"


def bytes_per_token(model, dtype) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * torch.empty((), dtype=dtype).element_size()


def memory_now(device) -> dict:
    out = {"peak_rss_bytes": common.peak_rss_bytes(), "rss_bytes": common.current_rss_bytes()}
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


@torch.inference_mode()
def stream_cost(model, jobs: list[tuple[PolicySpec, list[int]]], budget: int, chunk: int, vocab: int, seed: int = 0):
    """Feeds the same random ids through a fresh cache per (spec, checkpoint lengths), round robin: every chunk goes
    to every policy in turn, so the load of a shared machine hits them alike. One row per policy and checkpoint."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    policies.prepare(model)
    total = max(max(lengths) for _, lengths in jobs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (total,), generator=gen).to(device)
    per_token = bytes_per_token(model, dtype)
    runs = []
    for spec, lengths in jobs:
        cache_budget = max(lengths) if spec.policy == "full" else budget
        warm = policies.make_cache(spec, model, cache_budget, chunk, device, dtype)  # warm-up, untimed
        for s in range(0, min(max(lengths), budget + 4 * chunk), chunk):
            policies.feed_chunk(model, warm, ids[s:s + chunk].unsqueeze(0))
        del warm
        runs.append({"spec": spec, "todo": sorted(lengths), "times": [], "seconds": 0.0,
                     "cache": policies.make_cache(spec, model, cache_budget, chunk, device, dtype)})
    rows, fed = [], 0
    while any(r["todo"] for r in runs):
        x = ids[fed:fed + chunk].unsqueeze(0)
        fed += x.shape[1]
        for r in runs:
            if not r["todo"]:
                continue
            t = time.perf_counter()
            policies.feed_chunk(model, r["cache"], x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            r["times"].append(time.perf_counter() - t)
            r["seconds"] += r["times"][-1]
            if fed >= r["todo"][0]:
                stats = r["cache"].stats()
                last = sorted(r["times"][-TIMED_CHUNKS:])
                rows.append({"policy": r["spec"].name, "length": fed, "chunk_ms": 1e3 * last[len(last) // 2],
                             "stored_tokens": stats["stored"], "stored_kv_bytes": stats["stored"] * per_token,
                             "allocated_kv_bytes": stats.get("kv_bytes"), "seconds": r["seconds"],
                             **memory_now(device)})
                r["todo"].pop(0)
                if not r["todo"]:
                    r["cache"] = None  # free a finished policy's buffers
    return rows


def worker(argv) -> int:
    """Child process: one policy, rows as JSON on the last stdout line."""
    job = json.loads(argv[0])
    torch.set_num_threads(job["threads"]) if job["threads"] > 0 else None
    device = common.pick_device(job["device"])
    model, _ = load_or_build(job["model"], device, getattr(torch, job["dtype"]))
    rows = stream_cost(model, [(PolicySpec(**job["spec"]), job["lengths"])], job["budget"], job["chunk"],
                       model.config.vocab_size)
    print(json.dumps(rows))
    return 0


def run_isolated(spec: PolicySpec, lengths, args, dtype) -> list[dict]:
    job = {"spec": asdict(spec), "lengths": lengths, "budget": args.budget, "chunk": args.chunk, "model": args.model,
           "device": args.device, "dtype": str(dtype).replace("torch.", ""), "threads": args.threads}
    out = subprocess.run([sys.executable, "-m", "infmllm_ros.bench.cost", "--worker", json.dumps(job)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"cost worker for {spec.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_ratios(rows: list[dict], base: str = "streaming_llm") -> None:
    ref = {r["length"]: r for r in rows if r["policy"] == base}
    for r in rows:
        b = ref.get(r["length"])
        if b:
            r["chunk_ms_vs_streaming_llm"] = r["chunk_ms"] / b["chunk_ms"]
            r["stored_kv_vs_streaming_llm"] = r["stored_kv_bytes"] / max(1, b["stored_kv_bytes"])


def markdown(res: dict) -> str:
    mem = "cuda_max_allocated_bytes" if res["device"].startswith("cuda") else "peak_rss_bytes"
    header = ["policy", "stream tokens", "ms / chunk", "x StreamingLLM", "stored KV MiB", "allocated KV MiB",
              f"{'CUDA max allocated' if mem.startswith('cuda') else 'peak RSS'} MiB"]
    rows = [[r["policy"], r["length"], r["chunk_ms"], r.get("chunk_ms_vs_streaming_llm"), r["stored_kv_bytes"] / 2**20,
             r["allocated_kv_bytes"] / 2**20 if r["allocated_kv_bytes"] is not None else None, r[mem] / 2**20]
            for r in res["rows"]]
    skipped = "".join(f"\n- {k}: {v}" for k, v in res["skipped"].items())
    peaks = "Peaks are per policy (one process each)." if res["isolated"] else (
        "One process, policies round robin on the same chunks: peaks accumulate.")
    return (f"### Cost vs stream length (`cost`)\n\n"
            f"Model {res['model']}, budget {res['budget']}, chunk {res['chunk']}, "
            f"{res['device']} {res['dtype']}; {common.describe_machine(res['machine'])}; commit {res['commit']}. "
            f"{peaks}\n\n`{res['command']}`\n{skipped}\n\n" + common.md_table(header, rows))


def plot(res: dict, path: Path) -> None:
    plt = common.pyplot()
    mem = "cuda_max_allocated_bytes" if res["device"].startswith("cuda") else "peak_rss_bytes"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in dict.fromkeys(r["policy"] for r in res["rows"]):
        rs = [r for r in res["rows"] if r["policy"] == name]
        x = [r["length"] for r in rs]
        axes[0].plot(x, [r["chunk_ms"] for r in rs], marker="o", label=name)
        axes[1].plot(x, [r["stored_kv_bytes"] / 2**20 for r in rs], marker="o", label=name)
        axes[2].plot(x, [r[mem] / 2**20 for r in rs], marker="o", label=name)
    common.style_length_axes(axes, ["ms per chunk", "stored KV (MiB)", mem.replace("_bytes", "") + " (MiB)"])
    common.save_figure(fig, path)


def parse(argv):
    p = argparse.ArgumentParser(prog="infmllm-bench cost", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF causal LM (default: the in-house model, else random)")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="checkpoints (default 4K..256K; +1M on GPU)")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--full-max", type=int, default=0,
                   help="longest stream for the full cache (default 16K CPU, 64K GPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", help="auto = float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--in-process", action="store_true",
                   help="all policies in this process, round robin per chunk (peaks then accumulate)")
    p.add_argument("--out", default=str(common.DEFAULT_OUT))
    p.add_argument("--name", default="cost")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    args = parse(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    args.device = str(device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    lengths = sorted(args.lengths or (GPU_LENGTHS if device.type == "cuda" else CPU_LENGTHS))
    full_max = args.full_max or (65536 if device.type == "cuda" else 16384)
    m = common.machine()
    common.print_machine(m)
    model, model_name = load_or_build(args.model, device, dtype)
    skipped, rows, no_cache = {}, [], policies.cache_available()
    if no_cache:
        skipped["bounded policies"] = no_cache
    jobs = []
    for spec in cost_policies():
        if spec.policy != "full" and no_cache:
            continue
        todo = [n for n in lengths if spec.policy != "full" or n <= full_max]
        if len(todo) < len(lengths):
            skipped[spec.name] = f"lengths > {full_max} skipped (quadratic time; --full-max)"
        if todo:
            jobs.append((spec, todo))
    t = time.perf_counter()
    if args.in_process:
        rows += stream_cost(model, jobs, args.budget, args.chunk, model.config.vocab_size)
    else:
        for spec, todo in jobs:
            rows += run_isolated(spec, todo, args, dtype)
            print(f"  {spec.name}: {len(todo)} lengths up to {max(todo)} ({time.perf_counter() - t:.1f}s)", flush=True)
    add_ratios(rows)
    res = {"kind": "cost", "model": model_name, "budget": args.budget, "chunk": args.chunk, "lengths": lengths,
           "full_max": full_max, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "isolated": not args.in_process, "skipped": skipped, "rows": rows, "machine": m,
           "commit": common.git_commit(), "command": common.command_line(["cost", *argv])}
    paths = common.write_results(args.out, args.name, res, markdown(res))
    plot(res, Path(args.out) / f"{args.name}.png")
    print(f"wrote {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

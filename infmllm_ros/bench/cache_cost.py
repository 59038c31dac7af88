"""Cache cost: per-chunk latency and stored KV bytes vs stream length, every policy, ratios to StreamingLLM.

    python -m infmllm_ros.bench.cache_cost --lengths 4096 16384 65536 262144 --out cache_cost.json

A tiny random Llama-shaped model (the cost of the cache does not depend on the weights) streams random token ids,
chunk by chunk, through BoundedCache exactly as the session does (begin_forward -> forward -> end_chunk). At each
checkpoint length: the median latency of the chunks just before it (forward + eviction), the bytes of K/V stored
and the bytes of the cache's buffers. "full" never evicts, so its buffers are sized for the longest stream and its
chunks attend to everything seen (it stops at --full-max). Policies take turns on the same chunks. Not a unit
test: numbers depend on the machine, which is recorded.

    python -m infmllm_ros.bench.cache_cost --layer-scaling --out docs/bench/cache_layer_scaling.json

--layer-scaling instead times end_chunk alone (selection + re-indexing + compaction) at 4, 16 and 32 layers with
real widths (16 query heads, head_dim 128, 2 and 8 KV heads), and counts the aten ops it dispatches. The model's
weights play no part in end_chunk, so the cache is filled directly with random K/V and random window scores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

POLICIES = ("streaming_llm", "saddle", "h2o", "full")
TIMED = 16  # chunks timed before each checkpoint (median)


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "torch_threads":
            torch.get_num_threads(), "torch": torch.__version__, "gpu": gpu}  # fmt: skip


def tiny_llama(layers: int, hidden: int, heads: int, kv_heads: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from infmllm_ros import attention

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1 << 22,
    )
    model = LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)
    attention.install(model)
    return model


class Runner:
    """One policy's cache and its timings."""

    def __init__(self, model, policy: str, longest: int, args, device, dtype):
        from infmllm_ros.cache import BoundedCache, CacheConfig

        budget = longest if policy == "full" else args.budget
        cfg = CacheConfig(policy=policy, budget=budget, recent=min(args.recent, budget), window=args.window,
                          sinks=args.sinks, max_chunk=args.chunk, max_new_tokens=0)  # fmt: skip
        self.policy, self.model, self.device = policy, model, device
        self.cache = BoundedCache(cfg, model.config, device, dtype)
        self.per_token = self.cache.kv_bytes // cfg.capacity
        self.times: list[float] = []

    @torch.no_grad()
    def chunk(self, ids: torch.Tensor) -> None:
        cache, q = self.cache, ids.shape[1]
        pos = (cache.next_position + torch.arange(q, device=self.device))[None]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        cache.begin_forward(pos, prefill=True)
        self.model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1,
                   **cache.forward_kwargs())  # fmt: skip
        cache.end_chunk()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - t)

    def row(self) -> dict:
        c, recent = self.cache, sorted(self.times[-TIMED:])
        return {"policy": self.policy, "length": c.seen, "chunk_ms": 1e3 * recent[len(recent) // 2],
                "stored": c.stored, "stored_kv_bytes": c.stored * self.per_token, "buffer_bytes": c.kv_bytes,
                "next_position": c.next_position}  # fmt: skip


def run(model, policies: list[str], lengths: list[int], args, device, dtype) -> list[dict]:
    """Round robin: every policy gets the same chunk in turn, so load on a shared machine hits them alike.
    "full" stops after --full-max tokens (its chunks grow linearly with the stream)."""
    longest = max(lengths)
    runners = [Runner(model, p, min(longest, args.full_max) if p == "full" else longest, args, device, dtype)
               for p in policies]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    rows, seen = [], 0
    for length in sorted(lengths):
        while seen < length:
            ids = torch.randint(0, model.config.vocab_size, (1, args.chunk), generator=g).to(device)
            seen += args.chunk
            for r in runners:
                if not (r.policy == "full" and seen > args.full_max):
                    r.chunk(ids)
        for r in runners:
            if r.cache.seen == seen:
                rows.append(r.row())
                print(f"  {r.policy:14s} {seen:>9d} tokens  {rows[-1]['chunk_ms']:9.2f} ms/chunk  "
                      f"stored {r.cache.stored}", flush=True)  # fmt: skip
    return rows


def add_ratios(rows: list[dict]) -> None:
    base = {r["length"]: r for r in rows if r["policy"] == "streaming_llm"}
    for r in rows:
        b = base.get(r["length"])
        r["latency_ratio"] = r["chunk_ms"] / b["chunk_ms"] if b else None
        r["stored_kv_ratio"] = r["stored_kv_bytes"] / b["stored_kv_bytes"] if b else None


def table(rows: list[dict]) -> str:
    head = f"{'policy':14s} {'length':>9s} {'ms/chunk':>9s} {'x SLLM':>7s} {'stored KV':>11s} {'x SLLM':>7s} " \
           f"{'buffers':>11s}"  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['policy']:14s} {r['length']:>9d} {r['chunk_ms']:>9.2f} {r['latency_ratio']:>7.2f} "
                     f"{r['stored_kv_bytes'] / 2**10:>8.0f} KiB {r['stored_kv_ratio']:>7.2f} "
                     f"{r['buffer_bytes'] / 2**20:>7.1f} MiB")  # fmt: skip
    return "\n".join(lines)


class _OpCounter:
    """Counts aten ops dispatched (TorchDispatchMode): what a CUDA launch count follows."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops += 1
                return func(*args, **(kwargs or {}))

        self.ops, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def layer_scaling(args, device, dtype) -> list[dict]:
    from transformers import LlamaConfig

    from infmllm_ros.cache import BoundedCache, CacheConfig

    rows, g = [], torch.Generator().manual_seed(0)
    for kv_heads in (2, 8):
        for layers in (4, 16, 32):
            cfg = LlamaConfig(hidden_size=2048, num_attention_heads=16, num_key_value_heads=kv_heads,
                              num_hidden_layers=layers)  # fmt: skip
            cache = BoundedCache(CacheConfig(policy="saddle", budget=args.budget, recent=args.recent,
                                             window=args.window, sinks=args.sinks, max_chunk=args.chunk,
                                             max_new_tokens=0), cfg, device, dtype)  # fmt: skip
            k = torch.randn(1, kv_heads, args.chunk, 128, generator=g).to(device, dtype)
            times, ops = [], 0
            for i in range(args.budget // args.chunk + 1 + TIMED):
                pos = (cache.next_position + torch.arange(args.chunk, device=device))[None]
                cache.begin_forward(pos, prefill=True)
                for layer in cache.layers:
                    layer.update(k, k)
                    layer.record_scores(torch.rand(kv_heads, layer.stored, generator=g).to(device), "window")
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                if i == args.budget // args.chunk + 1:
                    with _OpCounter() as c:
                        cache.end_chunk()
                    ops = c.ops
                else:
                    cache.end_chunk()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            assert cache.evictions >= TIMED
            timed = sorted(times[-TIMED:])
            rows.append({"layers": layers, "kv_heads": kv_heads, "end_chunk_ms": 1e3 * timed[len(timed) // 2],
                         "ops": ops, "stored": cache.stored})  # fmt: skip
            print(f"  kv_heads {kv_heads}  layers {layers:2d}: end_chunk {rows[-1]['end_chunk_ms']:8.2f} ms, "
                  f"{ops} aten ops", flush=True)  # fmt: skip
    for r in rows:
        base = next(b for b in rows if b["kv_heads"] == r["kv_heads"] and b["layers"] == 4)
        r["time_ratio_to_4_layers"] = r["end_chunk_ms"] / base["end_chunk_ms"]
        r["ops_ratio_to_4_layers"] = r["ops"] / base["ops"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 262144])
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--recent", type=int, default=128)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--full-max", type=int, default=65536, help="stop the (quadratic) full cache here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--layer-scaling", action="store_true", help="end_chunk time and op count at 4/16/32 layers")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    if args.layer_scaling:
        info, t = machine(), time.perf_counter()
        print(f"machine: {info}")
        rows = layer_scaling(args, device, dtype)
        if args.out:
            result = {"benchmark": "cache_layer_scaling", "machine": info, "args": vars(args),
                      "wall_s": time.perf_counter() - t, "rows": rows}  # fmt: skip
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
            print(f"wrote {args.out}")
        return 0
    model = tiny_llama(args.layers, args.hidden, args.heads, args.kv_heads, device, dtype)
    info = machine()
    print(f"machine: {info}")
    policies = ["streaming_llm"] + [x for x in args.policies if x != "streaming_llm"]
    t = time.perf_counter()
    rows = run(model, policies, args.lengths, args, device, dtype)
    wall = time.perf_counter() - t
    add_ratios(rows)
    print(table(rows))
    if args.out:
        result = {"benchmark": "cache_cost", "machine": info, "args": vars(args), "wall_s": wall, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

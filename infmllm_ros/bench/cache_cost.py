"""Cache cost: per-chunk latency and stored KV bytes vs stream length, every policy, ratios to StreamingLLM.

    python -m infmllm_ros.bench.cache_cost --lengths 4096 16384 65536 262144 --out cache_cost.json

A tiny random Llama-shaped model (the cost of the cache does not depend on the weights) streams random token ids,
chunk by chunk, through BoundedCache exactly as the session does (begin_forward -> forward -> end_chunk). At each
checkpoint length: the median latency of the chunks just before it (forward + eviction), the bytes of K/V stored
and the bytes of the cache's buffers. "full" never evicts, so its buffers are sized for the longest stream and its
chunks attend to everything seen (it stops at --full-max). Policies take turns on the same chunks. Not a unit
test: numbers depend on the machine, which is recorded.
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
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
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

"""Read cost: what reading the stored keys costs per layer per decode step, rotate-on-read vs the read copy.

    python -m infmllm_ros.bench.read_cost --out read_cost.json

One BoundedCache layer (2 KV heads, head_dim 128, capacity budget + max_chunk + max_new_tokens = 1344 slots by
default) is filled and evicted once, so every kept key sits away from where it was rotated; then decode steps
append one token each. Timed per decode step, side by side in one run:

* rotate-on-read (the CUDA default, and what every device did before): `update` + turning every stored key by its
  offset (`kernels.rotate_keys`), which recomputes cos/sin of every slot at every step;
* read copy (the CPU default): `update` returning the copy rebuilt once after the eviction, plus that rebuild once
  per chunk (reported apart: it is paid at the first forward after each eviction, not per step).

Both read bit-identical keys (test/cache/test_read_copy.py). Not a unit test: numbers depend on the machine and
its load, which are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from infmllm_ros.bench import common


def _ms(fn, reps: int) -> tuple[float, float]:
    """(median, fastest) ms of reps calls: on a shared machine the fastest is the least disturbed."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2], 1e3 * times[0]


def _time_reads(cfg, model_config, dtype, read_copy: bool, args, g):
    """((median, fastest) ms per decode step, median ms of one rebuild of the read copy or 0, buffer bytes) for one
    cache layer."""
    from infmllm_ros.cache import BoundedCache

    cache = BoundedCache(cfg, model_config, "cpu", dtype, read_copy=read_copy)
    layer = cache.layers[0]

    def forward(q, prefill):
        cache.begin_forward(torch.zeros(cache.rows, q, dtype=torch.long) + cache.next_position + torch.arange(q),
                            prefill=prefill)  # fmt: skip
        k = torch.randn(1, args.kv_heads, q, 128, generator=g).to(dtype)
        return layer.update(k, k)

    while cache.evictions == 0:  # fill to the budget + one chunk, evict: every kept key has moved
        forward(args.chunk, True)
        cache.end_chunk()
    forward(args.chunk, True)  # the chunk whose forward rebuilds the copy
    rebuild = _ms(lambda: layer._refresh_read_keys(args.budget), args.reps)[0] if read_copy else 0.0

    def step():  # one decode step's read, then undone so that every rep reads the same slot count
        cache.decoded = 0
        forward(1, False)
        layer.stored -= 1
        layer.seen -= 1

    layer.stored = cfg.capacity - 1  # the step that fills the last slot: the most keys read
    return _ms(step, args.reps), rebuild, cache.kv_bytes


def measure(dtype, args, mrope: bool = False) -> dict:
    from transformers import LlamaConfig, Qwen2VLTextConfig

    from infmllm_ros.cache import CacheConfig

    kw = dict(hidden_size=16 * 128, num_attention_heads=16, num_key_value_heads=args.kv_heads, num_hidden_layers=1)
    model_config = (Qwen2VLTextConfig(**kw, rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                                              "rope_theta": 1e6})
                    if mrope else LlamaConfig(**kw))  # fmt: skip
    cfg = CacheConfig(policy="streaming_llm", budget=args.budget, recent=0, sinks=4, max_chunk=args.chunk,
                      max_new_tokens=args.new)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    (old_ms, old_min), _, old_bytes = _time_reads(cfg, model_config, dtype, False, args, g)
    (new_ms, new_min), rebuild, new_bytes = _time_reads(cfg, model_config, dtype, True, args, g)
    return {"dtype": str(dtype).replace("torch.", ""), "rope": "mrope" if mrope else "1d", "kv_heads": args.kv_heads,
            "slots": cfg.capacity, "head_dim": 128, "rotate_on_read_step_ms": old_ms, "read_copy_step_ms": new_ms,
            "rotate_on_read_fastest_ms": old_min, "read_copy_fastest_ms": new_min,
            "read_copy_rebuild_ms": rebuild, "speedup": old_ms / max(new_ms, 1e-9),
            "rotate_on_read_kv_bytes": old_bytes, "read_copy_kv_bytes": new_bytes,
            "extra_bytes": new_bytes - old_bytes}  # fmt: skip


def markdown(res: dict) -> str:
    a = res["args"]
    rows = [[r["rope"], r["dtype"], f"{r['rotate_on_read_step_ms']:.3f} ({r['rotate_on_read_fastest_ms']:.3f})",
             f"{r['read_copy_step_ms']:.3f} ({r['read_copy_fastest_ms']:.3f})", r["speedup"],
             r["read_copy_rebuild_ms"], r["extra_bytes"] / 2**10] for r in res["rows"]]  # fmt: skip
    load = res.get("load_average_after")
    return (f"### Reading the stored keys per layer per decode step (`read-cost`)\n\n"
            f"One cache layer: {a['kv_heads']} KV heads x {res['rows'][0]['slots']} slots (budget {a['budget']} + "
            f"chunk {a['chunk']} + new {a['new']}) x head_dim 128, every kept key moved by an eviction; median of "
            f"{a['reps']} decode steps each; {common.describe_machine(res['machine'])}"
            + (f" (load average after: {load[0]:.2f})" if load else "") + f"; commit {res['commit']}.\n\n"
            f"`{res['command']}`\n\n"
            "Rotate-on-read (CUDA default) turns every stored key at every forward; the read copy (CPU default) is "
            "rebuilt once per layer after each eviction (the rebuild column, paid once per chunk) and costs one more "
            "K buffer (extra KiB per layer). Both read bit-identical keys (test/cache/test_read_copy.py).\n\n"
            + common.md_table(["RoPE", "dtype", "rotate-on-read ms/step (fastest)", "read copy ms/step (fastest)",
                               "speed-up (medians)",
                               "rebuild ms/chunk", "extra KiB/layer"], rows) + "\n")  # fmt: skip


def plot(res: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(1, 1, figsize=(5, 3.4))
    labels = [f"{r['rope']} {r['dtype']}" for r in res["rows"]]
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [r["rotate_on_read_step_ms"] for r in res["rows"]], 0.4, label="rotate-on-read")
    ax.bar([i + 0.2 for i in x], [r["read_copy_step_ms"] for r in res["rows"]], 0.4, label="read copy")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("ms per layer per decode step")
    ax.legend()
    common.save_figure(fig, path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--new", type=int, default=64, help="max_new_tokens (capacity = budget + chunk + new)")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here (a folder: read_cost.json in it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = common.machine()
    common.print_machine(info)
    rows = []
    for mrope in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            r = measure(dtype, args, mrope)
            rows.append(r)
            print(f"  {r['rope']:5s} {r['dtype']:8s} {r['kv_heads']} KV heads x {r['slots']} slots x 128: "
                  f"rotate-on-read {r['rotate_on_read_step_ms']:.3f} ms/step (fastest "
                  f"{r['rotate_on_read_fastest_ms']:.3f}), read copy {r['read_copy_step_ms']:.3f} (fastest "
                  f"{r['read_copy_fastest_ms']:.3f}) ms/step (x{r['speedup']:.0f}); rebuild "
                  f"{r['read_copy_rebuild_ms']:.3f} ms per chunk, +{r['extra_bytes'] / 2**10:.0f} KiB",
                  flush=True)  # fmt: skip
    res = {"benchmark": "read_cost", "kind": "read_cost", "machine": info, "args": vars(args),
           "load_average_after": list(os.getloadavg()), "commit": common.git_commit(),
           "command": common.command_line(["read-cost", *argv]), "rows": rows}  # fmt: skip
    print(f"load average after: {res['load_average_after']}")
    if args.out:
        out = Path(args.out)
        out = out / "read_cost.json" if out.suffix != ".json" else out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

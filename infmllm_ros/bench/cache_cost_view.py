"""Renders the cache engineer's `cache_cost` JSON (python -m infmllm_ros.bench.cache_cost --out X.json) for the report.

That benchmark writes its own format (key "benchmark": "cache_cost", no markdown or plot); this module gives it the
`markdown(res)` / `plot(res, path)` pair every report section has, without touching cache_cost.py.
"""

from __future__ import annotations

from pathlib import Path

from infmllm_ros.bench import common


def command(res: dict) -> str:
    a = res.get("args", {})
    parts = ["infmllm-bench cache-cost"]
    for key in ("lengths", "policies", "chunk", "budget", "recent", "window", "sinks", "layers", "hidden", "heads",
                "kv_heads", "full_max", "device", "dtype", "threads", "out"):
        if key in a and a[key] is not None:
            v = a[key]
            parts.append(f"--{key.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v)))
    return " ".join(parts)


def full_machine(machine: dict) -> dict:
    """cache_cost's machine dict with the keys common.describe_machine reads (its gpu is a name or None)."""
    m = {"torch_threads": "?", "transformers": "?", **machine}
    if isinstance(m.get("gpu"), str):
        m["gpu"] = {"name": m["gpu"], "count": 1}
    return m


def markdown(res: dict) -> str:
    a = res.get("args", {})
    m = full_machine(res["machine"])
    rows = [[r["policy"], r["length"], r["chunk_ms"], r.get("latency_ratio"), r["stored_kv_bytes"] / 2**20,
             r.get("stored_kv_ratio"), r["buffer_bytes"] / 2**20] for r in res["rows"]]
    return (f"### Cache cost, tiny random Llama (`cache-cost`, the cache's own benchmark)\n\n"
            f"{a.get('layers')} layers, hidden {a.get('hidden')}, {a.get('heads')}/{a.get('kv_heads')} heads, budget "
            f"{a.get('budget')}, chunk {a.get('chunk')}, {a.get('device')} {a.get('dtype')}; "
            f"{common.describe_machine(m)}; {res.get('wall_s', 0):.0f} s.\n\n`{command(res)}`\n\n"
            + common.md_table(["policy", "stream tokens", "ms / chunk", "x StreamingLLM", "stored KV MiB",
                               "x StreamingLLM", "buffers MiB"], rows))


def plot(res: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name in dict.fromkeys(r["policy"] for r in res["rows"]):
        rs = [r for r in res["rows"] if r["policy"] == name]
        axes[0].plot([r["length"] for r in rs], [r["chunk_ms"] for r in rs], marker="o", label=name)
        axes[1].plot([r["length"] for r in rs], [r["stored_kv_bytes"] / 2**20 for r in rs], marker="o", label=name)
    common.style_length_axes(axes, ["ms per chunk", "stored KV (MiB)"])
    common.save_figure(fig, path)

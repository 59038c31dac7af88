"""Renders `cache-cost --layer-scaling` JSON (key "benchmark": "cache_layer_scaling") for the report.

The question it answers: does one eviction (end_chunk) cost the same number of dispatched ops, and ideally the
same time, at 4, 16 and 32 layers (stacked [layers, heads, slots] metadata, one selection, one compaction)?
"""

from __future__ import annotations

from pathlib import Path

from infmllm_ros.bench import cache_cost_view, common


def command(res: dict) -> str:
    a = res.get("args", {})
    return (f"infmllm-bench cache-cost --layer-scaling --budget {a.get('budget')} --chunk {a.get('chunk')} "
            f"--out {a.get('out')}")


def markdown(res: dict) -> str:
    a = res.get("args", {})
    rows = [[r["kv_heads"], r["layers"], r["end_chunk_ms"], r["time_ratio_to_4_layers"], r["ops"]]
            for r in res["rows"]]
    most = max(r["layers"] for r in res["rows"])
    worst = max(r["time_ratio_to_4_layers"] for r in res["rows"] if r["layers"] == most)
    ops = sorted({r["ops"] for r in res["rows"]})
    machine = common.describe_machine(cache_cost_view.full_machine(res["machine"]))
    return (f"### end_chunk at {' / '.join(str(n) for n in sorted({r['layers'] for r in res['rows']}))} layers "
            f"(`cache-cost --layer-scaling`)\n\n"
            f"Real widths (hidden 2048, 16 query heads, head_dim 128, KV heads as listed), saddle, budget "
            f"{a.get('budget')}, chunk {a.get('chunk')}, {a.get('device')} {a.get('dtype')}, random K/V and scores "
            f"(weights play no part in end_chunk); {machine}. "
            f"Median of 16 evictions per row; ops = aten ops dispatched by one end_chunk (TorchDispatchMode).\n\n"
            f"`{command(res)}`\n\n"
            + common.md_table(["KV heads", "layers", "end_chunk ms", "x 4 layers", "aten ops"], rows)
            + f"\n\nDispatched ops per eviction: {', '.join(map(str, ops))} at every layer count (one host sync). "
            f"Time, largest / 4 layers: {worst:.1f}x (goal 2): on a CPU the eviction is the gather of every "
            "layer's kept K/V, memory traffic that grows with the layers; the launch-bound GPU case the goal is "
            "about has not been measured.\n")


def plot(res: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(1, 1, figsize=(5, 3.4))
    for kv in sorted({r["kv_heads"] for r in res["rows"]}):
        rs = sorted((r for r in res["rows"] if r["kv_heads"] == kv), key=lambda r: r["layers"])
        ax.plot([r["layers"] for r in rs], [r["end_chunk_ms"] for r in rs], marker="o", label=f"{kv} KV heads")
    ax.set_xlabel("layers")
    ax.set_ylabel("end_chunk ms")
    ax.legend()
    common.save_figure(fig, path)

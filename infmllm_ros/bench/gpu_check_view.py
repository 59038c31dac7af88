"""The report's view of `gpu_check` results: markdown table, plot, findings (docs/BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

from infmllm_ros.bench import common


def markdown(res: dict) -> str:
    lines = ["### GPU check (`make gpu-check`)\n",
             f"{res['device_name']} ({res['device']}, stream dtype {res['dtype']}{', toy sizes' if res['tiny'] else ''}"
             f"); {common.describe_machine(res['machine'])}; commit {res['commit']}; {res['seconds']} s.\n",
             f"`{res['command']}`\n",
             "| kernel | impl | dtype | window | max abs err | vs | ok |", "|---|---|---|---|---|---|---|"]
    for r in res["kernels"]:
        vs = "fp64 formula" if r["kernel"] == "window_scores" else "exact move" if r["kernel"] == "compact" else \
            f"torch ref (fp64: {r['max_abs_err_vs_fp64']:.1e})"
        lines.append(f"| {r['kernel']} | {r['impl']} | {r['dtype']} | {r.get('window', '')} | "
                     f"{r['max_abs_err']:.2e} | {vs} | {'yes' if r['ok'] else '**no**'} |")
    s = res.get("stream")
    if s:
        m = s["model"]
        lines += ["", f"Stream: random-weight {m['family']}, {m['parameters'] / 1e9:.2f}B parameters, {m['layers']} "
                  f"layers, {m['heads']}/{m['kv_heads']} heads; saddle budget {s['cache']['budget']}, chunk "
                  f"{s['cache']['max_chunk']}, window {s['cache']['window'] or 'whole chunk'}"
                  + (f"; **stopped early**: {s['stopped_early']}" if s["stopped_early"] else "") + ".\n",
                  "| tokens | s | tokens/s (since last row) | stored | next position | peak memory (MiB) |",
                  "|---|---|---|---|---|---|"]
        for p in s["points"]:
            peak = p.get("max_memory_allocated", p.get("max_rss_bytes", 0)) / 2**20
            lines.append(f"| {p['tokens']} | {p['seconds']} | {p['tokens_per_s']} | {p['stored']} | "
                         f"{p['next_position']} | {peak:.0f} |")
        d = s["decode"]
        lines += ["", f"Decode: median step {1e3 * d['median_step_s']:.2f} ms; bound (weights "
                  f"{d['weight_bytes'] / 2**30:.2f} GiB + kept KV {d['kept_kv_bytes'] / 2**20:.1f} MiB) / copy "
                  f"bandwidth {d['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s = "
                  f"{1e3 * d['bandwidth_bound_s']:.2f} ms: x{d['step_over_bound']:.2f} of the bound."]
    rows = res.get("layer_scaling")
    if rows:
        lines += ["", "Eviction cost vs layers (end_chunk alone, hidden 2048, head_dim 128; goal: 32 / 4 layers <= 2):",
                  "", "| KV heads | layers | end_chunk ms | aten ops | time / 4 layers | ops / 4 layers |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['kv_heads']} | {r['layers']} | {r['end_chunk_ms']:.2f} | {r['ops']} | "
                  f"{r['time_ratio_to_4_layers']:.2f} | {r['ops_ratio_to_4_layers']:.2f} |" for r in rows]
    p = res.get("prefill")
    if p:
        lines += ["", f"Prefill breakdown ({p['layers']} layers at the stream's widths, chunk {p['chunk']}, budget "
                  f"{p['budget']}): bounded saddle {p['saddle_ms']:.1f} ms, streaming_llm (no scores) "
                  f"{p['streaming_llm_ms']:.1f} ms, plain transformers SDPA {p['plain_sdpa_ms']:.1f} ms per chunk "
                  f"(saddle x{p['saddle_over_plain']:.2f} of plain); window scores alone {p['window_scores_ms']:.2f} "
                  f"ms per layer (torch reference {p['window_scores_ref_ms']:.2f} ms)."]
    if res.get("note"):
        lines += ["", f"Note: {res['note']}"]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    pts = (res.get("stream") or {}).get("points", [])
    key = "max_memory_allocated" if pts and "max_memory_allocated" in pts[0] else "max_rss_bytes"
    ax.plot([p["tokens"] for p in pts], [p.get(key, 0) / 2**30 for p in pts], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel(f"{key} (GiB)")
    ax.set_title("peak memory vs stream length (flat = bounded)")
    common.save_figure(fig, path)


def findings(name: str, res: dict) -> list[str]:
    bad = [f"{r['kernel']} {r['dtype']}" for r in res["kernels"] if not r["ok"]]
    out = [f"`{name}`: kernels vs references on {res['device_name']}: " + (", ".join(bad) + " **differ**" if bad
                                                                            else "all within tolerance") + "."]
    s = res.get("stream")
    if s and s["points"]:
        first, last = s["points"][0], s["points"][-1]
        key = "max_memory_allocated" if "max_memory_allocated" in last else "max_rss_bytes"
        out.append(f"`{name}`: {last['tokens']} tokens at {last['tokens_per_s']} tokens/s, peak memory "
                   f"{first[key] / 2**30:.2f} GiB at {first['tokens']} tokens -> {last[key] / 2**30:.2f} GiB; decode "
                   f"x{s['decode']['step_over_bound']:.2f} of the bandwidth bound.")
    worst = max((r["time_ratio_to_4_layers"] for r in res.get("layer_scaling") or [] if r["layers"] == 32),
                default=None)
    if worst is not None:
        out.append(f"`{name}`: end_chunk at 32 layers / 4 layers: x{worst:.2f} on {res['device_name']} (goal <= 2).")
    return out

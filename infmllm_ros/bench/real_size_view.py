"""Renders `infmllm-bench real-size` results (bench/real_size.py) for the report: `markdown(res)`, `plot(res, png)`."""

from __future__ import annotations

from infmllm_ros.bench import common
from infmllm_ros.bench.real_size import METHODS, SHAPES


def markdown(res: dict) -> str:
    a = res["args"]
    run_s = f"{sum(r.get('wall_s', 0) for r in res['rows']) / 60:.0f} min"
    load = f", load average {res['machine'].get('load_avg_1min')} at the start"
    if res.get("load_avg_end") is not None:
        load += f", {res['load_avg_end']} at the end"
    note = common.machine_note(res["machine"], res.get("memory_gib"))
    shapes = [SHAPES[n] for n in {r["shape"] for r in res["rows"]} if n in SHAPES]
    full = all(a["text_layers"] >= sh["text"]["num_hidden_layers"] and a["vision_layers"] >=
               sh["vision"].get("num_hidden_layers", sh["vision"].get("depth", 0)) for sh in shapes)
    depth = "the published depth" if full else "cut"
    lines = [f"Machine: {note}; copy bandwidth {res['bandwidth_gb_s']} GB/s. Random weights "
             f"at the published widths, {a['text_layers']} text / {a['vision_layers']} vision layers ({depth}), "
             f"fp32, 640x480 frames, session budget {a['budget']} tokens, re-prefill keeps the last {a['k_frames']} "
             f"frames, {a['questions']} questions per stream, {a['new_tokens']} new tokens each, torch threads "
             f"{a['threads']}. Stream lengths {a['frames']} frames, all in one run ({run_s}{load}). "
             "Observe = vision + prefill (the re-prefill baseline does its vision and prefill inside the question). "
             "Peak = the run's own process VmHWM, reset after building the model where the row says so (peak "
             "source) so that random init's transient copy is not counted; + = above the RSS right after building. "
             "Bandwidth limit = (decode-read weight bytes + kept KV "
             "bytes) / copy bandwidth.", "",
             "| shape | method | frames | observe ms (vision + prefill) | decode ms/token | question ms | peak RSS MiB "
             "| kept tokens | decode / bandwidth limit |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "frames_done" in r:  # cut off by --child-timeout: what it had measured
            lines.append(f"| {r['shape']} | {r['method']} | {r['frames']} | cut off after {r['wall_s']:.0f} s at "
                         f"{r['frames_done']} frames: observe median {r['observe_ms_so_far']:.0f}, last "
                         f"{r['last_observe_ms']:.0f} ({r['last_vision_ms']:.0f} vision) |||||")
            continue
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['method']} | {r['frames']} | failed: {r['error'][-120:]!r} |||||")
            continue
        peak = r["peak_rss_mib"] if r.get("peak_rss_source") else "n/a"
        if r.get("rss_after_build_mib") and r.get("peak_rss_source") == "VmHWM after build":
            peak = f"{r['peak_rss_mib']:.0f} (+{r['peak_rss_mib'] - r['rss_after_build_mib']:.0f})"
        if r["method"] == "reprefill_last_k":  # its vision and prefill happen inside each question
            lines.append(f"| {r['shape']} | {r['method']} | {r['frames']} | in the question | "
                         f"{r['decode_ms_per_token']:.1f} | {r['question_ms']:.0f} | {peak} | {r['kept_tokens']} | "
                         f"{r['decode_over_limit']:.2f} |")
            continue
        lines.append(f"| {r['shape']} | {r['method']} | {r['frames']} | {r['observe_ms']:.0f} ({r['vision_ms']:.0f} + "
                     f"{r['prefill_ms']:.0f}) | {r['decode_ms_per_token']:.1f} | {r['question_ms']:.0f} | "
                     f"{peak} | {r['kept_tokens']} | {r['decode_over_limit']:.2f} |")
    lines += ["", _notes(res)]
    for r in res["rows"]:
        for name, ops in (r.get("profile") or {}).items():
            lines += ["", f"Profile, {r['shape']} {r['method']} {r['frames']} frames, {name} (top ops, self CPU):",
                      ", ".join(f"{o['op']} {o['self_ms']:.1f} ms x{o['calls']}" for o in ops[:8])]
    return "\n".join(lines)


def _notes(res: dict) -> str:
    """The Notes paragraph: the figures it quotes are computed from the rows, so it stays true on a rerun."""
    ok = [r for r in res["rows"] if "error" not in r]
    out = ["Notes."]
    per_frame = {r["shape"]: r["tokens_per_frame"] for r in ok if r.get("tokens_per_frame")}
    if per_frame:
        out.append("The session downscales frames to its frame bounds (" + ", ".join(
            f"{k} {v} tokens per frame" for k, v in sorted(per_frame.items())) + "); the plain baselines feed the "
            "processor's default size (Qwen2-VL about 390 image tokens for 640x480) plus a chat turn per frame.")
    kept = [r["kept_tokens"] for r in ok if r["method"] in ("saddle", "streaming_llm")]
    if kept:
        out.append(f"The session keeps {min(kept)}-{max(kept)} tokens at every stream length (budget "
                   f"{res['args']['budget']} + the newest chunk).")
    for shape in sorted({r["shape"] for r in res["rows"]}):
        dyn = sorted((r["frames"], r) for r in ok if r["shape"] == shape and r["method"] == "dynamic_cache")
        ses = sorted((r["frames"], r) for r in ok if r["shape"] == shape and r["method"] == "streaming_llm")
        if len(dyn) >= 2:
            (f0, a), (f1, b) = dyn[0], dyn[-1]
            line = (f"{shape}: DynamicCache keeps everything, {a['kept_tokens']} tokens at {f0} frames and "
                    f"{b['kept_tokens']} at {f1}; its observe median goes {a['observe_ms']:.0f} -> "
                    f"{b['observe_ms']:.0f} ms per frame")
            if ses:
                line += (f" (the session's: {ses[0][1]['observe_ms']:.0f} -> {ses[-1][1]['observe_ms']:.0f})")
            out.append(line + ".")
        for r in res["rows"]:
            if r["shape"] == shape and "frames_done" in r:
                out.append(f"{shape} {r['method']} at {r['frames']} frames was cut off after {r['wall_s']:.0f} s "
                           f"(--child-timeout) with {r['frames_done']} frames observed; its last frame took "
                           f"{r['last_observe_ms']:.0f} ms ({r['last_vision_ms']:.0f} of them vision), so the rest "
                           "is prefill against the growing cache.")
        rep = [r["question_ms"] for r in ok if r["shape"] == shape and r["method"] == "reprefill_last_k"]
        sq = [r["question_ms"] for r in ok if r["shape"] == shape and r["method"] in ("saddle", "streaming_llm")]
        if rep and sq:
            out.append(f"{shape}: re-prefilling the last {res['args']['k_frames']} frames costs "
                       f"{min(rep):.0f}-{max(rep):.0f} ms per question against {min(sq):.0f}-{max(sq):.0f} for the "
                       "session.")
    pairs = {}
    for r in ok:
        if r["method"] in ("saddle", "streaming_llm"):
            pairs.setdefault((r["shape"], r["frames"]), {})[r["method"]] = r["observe_ms"]
    ratios = [max(v.values()) / min(v.values()) for v in pairs.values() if len(v) == 2 and min(v.values()) > 0]
    if ratios:
        out.append(f"Noise: saddle and streaming_llm do the same work per frame (same model, same frames, same "
                   f"budget), yet their observe medians differ by up to {100 * (max(ratios) - 1):.0f} % here: that is "
                   "this shared machine's scheduling noise, and any difference below it means nothing.")
    out.append("The plain Qwen2-VL DynamicCache run passes no M-RoPE positions, so its outputs are not exact (its "
               "timing and memory are). Decode / bandwidth limit below 1 means the copy bandwidth (read + write) "
               "understates what a read-only matmul gets.")
    prof = [(r, name, ops) for r in ok for name, ops in (r.get("profile") or {}).items()]
    for r, name, ops in prof:
        total = sum(o["self_ms"] for o in ops) or 1.0
        mm = sum(o["self_ms"] for o in ops if o["op"] in ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm"))
        rest = [o for o in ops if o["op"] not in ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm")][:3]
        out.append(f"Profile {r['shape']} {name}: matmuls {100 * mm / total:.0f} % of the listed self time; next "
                   + ", ".join(f"{o['op']} {o['self_ms']:.1f} ms" for o in rest) + ".")
    out.append("Beyond the matmuls: in an evicting observe the largest items are the vision tower's own "
               "(transformers' attention and transposed copies, aten::copy_ on [1, 1024, 768] at SmolVLM's 512x512, "
               "about 16 of 250 ms); the eviction's own ops (index, index_put_, cat on the kept KV) are a few ms at "
               "most. The biggest overhead found was outside our code: 2 torch threads on a shared 2-core machine made "
               "a decode step 130 ms against 37 ms with 1 thread (an earlier run, on an AMD EPYC), hence --threads 1.")
    return " ".join(out)


def plot(res: dict, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in res["rows"]})
    fig, axes = plt.subplots(len(shapes), 3, figsize=(14, 3.4 * len(shapes)), squeeze=False)
    for row, shape in zip(axes, shapes, strict=True):
        for method in METHODS:
            pts = sorted((r["frames"], r) for r in res["rows"] if r["shape"] == shape and r["method"] == method
                         and "error" not in r)
            if pts:
                row[0].plot([f for f, _ in pts], [r["question_ms"] for _, r in pts], "o-", label=method)
                row[1].plot([f for f, _ in pts], [r["decode_ms_per_token"] for _, r in pts], "o-", label=method)
                if method != "reprefill_last_k":  # its vision + prefill are inside the question
                    row[2].plot([f for f, _ in pts], [r["observe_ms"] for _, r in pts], "o-", label=method)
            cut = [r for r in res["rows"] if r["shape"] == shape and r["method"] == method and "frames_done" in r]
            for r in cut:  # a run cut off by --child-timeout: its median so far, marked
                row[2].plot([r["frames"]], [r["observe_ms_so_far"]], "x", color="k",
                            label=f"{method} cut off at {r['frames_done']} frames")
        row[0].set_title(f"{shape}: latency per question (ms)")
        row[1].set_title(f"{shape}: decode ms per token")
        row[2].set_title(f"{shape}: observe ms per frame (median)")
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("frames seen")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)

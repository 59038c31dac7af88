"""infmllm-bench real-size: SmolVLM-256M and Qwen2-VL-2B shapes (random weights, real widths) in one run, side by
side: the session (saddle, streaming_llm) against plain transformers with a DynamicCache over the growing
context, and against re-prefilling the last K frames per question (the sliding-window baseline).

Per method and stream length: observe time per frame (vision tower vs the rest = prefill), decode time per
token, latency per question and peak RSS (each run in its own process; VmHWM is that run's peak). The same
run measures this machine's memory bandwidth (a large tensor copy) and reports decode step /
((weight bytes + kept KV bytes) / bandwidth): 1.0 is the bandwidth limit of a memory-bound decode step. It also
profiles one session decode step and one evicting observe with torch.profiler.

Widths are the published config values; layer counts are cut (``--text-layers``, ``--vision-layers``) so the run
fits a shared 2-core CPU; the bandwidth ratio uses the weight bytes actually resident.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from infmllm_ros.bench import common
from infmllm_ros.bench.common import DEFAULT_OUT, git_commit, machine

# published config.json values (HuggingFaceTB/SmolVLM-256M-Instruct, Qwen/Qwen2-VL-2B-Instruct)
SHAPES = {
    "smolvlm_256m": dict(
        text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=64, vocab_size=49280, rope_theta=100000.0, rms_norm_eps=1e-5,
                  max_position_embeddings=8192),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    patch_size=16, image_size=512),
        scale_factor=4, image_side=512),
    "qwen2_vl_2b": dict(
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=32768,
                  tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}),
        vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2)),
}
METHODS = ("saddle", "streaming_llm", "dynamic_cache", "reprefill_last_k")


def build(name: str, text_layers: int, vision_layers: int, seed: int = 0):
    """(model, processor): the tiny builders' processors and tokenizers, the model at the published widths."""
    import torch
    import transformers as tf

    from infmllm_ros.engine import tiny

    torch.manual_seed(seed)
    shape = SHAPES[name]
    if name == "smolvlm_256m":
        _, proc = tiny.build("smolvlm")
        tok = proc.tokenizer
        side = shape["image_side"]
        proc.image_processor = tf.SmolVLMImageProcessorPil(size={"longest_edge": side},
                                                           max_image_size={"longest_edge": side},
                                                           do_image_splitting=False)
        proc.image_seq_len = (side // shape["vision"]["patch_size"]) ** 2 // shape["scale_factor"] ** 2  # 64
        text = dict(shape["text"], num_hidden_layers=text_layers, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        vision = dict(shape["vision"], num_hidden_layers=vision_layers)
        cfg = tf.SmolVLMConfig(vision_config=tf.SmolVLMVisionConfig(**vision), text_config=tf.LlamaConfig(**text),
                               scale_factor=shape["scale_factor"], image_token_id=tok.convert_tokens_to_ids("<image>"),
                               pad_token_id=tok.pad_token_id)
        model = tf.SmolVLMForConditionalGeneration(cfg)
    else:
        _, proc = tiny.build("qwen2_vl")
        tok = proc.tokenizer
        ids = tok.convert_tokens_to_ids
        proc.image_processor = tf.Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2)
        text = dict(shape["text"], num_hidden_layers=text_layers, bos_token_id=None,
                    eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
        vision = dict(shape["vision"], depth=vision_layers)
        cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                               video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                               vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True)
        model = tf.Qwen2VLForConditionalGeneration(cfg)
    return model.eval(), proc


def vision_tower(model):
    inner = model.model
    return getattr(inner, "vision_model", None) or inner.visual


class Timer:
    """Accumulates the wall time spent inside a module's forward (forward pre/post hooks)."""

    def __init__(self, module):
        self.total, self._t0 = 0.0, 0.0
        module.register_forward_pre_hook(lambda *a: setattr(self, "_t0", time.perf_counter()))
        module.register_forward_hook(lambda *a: setattr(self, "total", self.total + time.perf_counter() - self._t0))


def frames(n: int, h: int = 480, w: int = 640, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    for i in range(n):
        yield np.roll(base, 7 * i, axis=1)  # a panning camera


def measure_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """GB/s of a large tensor copy (read + write both counted), best of `reps`."""
    import torch

    n = int(gib * 2**30) // 4
    a, b = torch.ones(n), torch.empty(n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _text_weight_bytes(model) -> int:
    """What a decode step reads: everything but the vision tower and the input embedding table (one row of it)."""
    skip = {id(p) for p in vision_tower(model).parameters()}
    emb = model.get_input_embeddings().weight
    if emb is not model.get_output_embeddings().weight:
        skip.add(id(emb))
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def run_session(model, proc, policy: str, n_frames: int, budget: int, questions: int, new_tokens: int, profile: bool):
    import torch

    from infmllm_ros.cache import CacheConfig
    from infmllm_ros.engine import StreamingSession

    timer = Timer(vision_tower(model))
    cfg = CacheConfig(policy=policy, budget=budget, recent=min(64, budget // 4), window=32, max_chunk=512,
                      max_new_tokens=new_tokens)
    tok = proc.tokenizer
    s = StreamingSession(model, proc, cache=cfg, suppress_tokens=tok.all_special_ids, check_memory=False)
    obs, vis, asks, decode = [], [], [], []
    every = max(1, n_frames // questions)
    prof = {}
    for i, f in enumerate(frames(n_frames)):
        v0, t0 = timer.total, time.perf_counter()
        if profile and i == n_frames - 1:  # the cache is full by now: this observe evicts
            prof["evicting_observe"] = _profile(lambda fr=f, st=float(i): s.observe(fr, st))
        else:
            s.observe(f, float(i))
        obs.append(time.perf_counter() - t0)
        vis.append(timer.total - v0)
        _progress(i, obs, vis)
        if (i + 1) % every == 0:
            a = s.ask("What changed?", max_new_tokens=new_tokens)
            asks.append(a.latency_s)
            decode.append((a.latency_s - a.first_token_s) / max(1, len(a.tokens) - 1))
    if profile:
        prof["decode_step"] = _profile(lambda: s._decode_one(5))
    st = s.stats()
    return dict(obs=obs, vis=vis, asks=asks, decode=decode, kept_tokens=st["tokens_stored"], kv_bytes=st["kv_bytes"],
                tokens_per_frame=st["last_frame_tokens"], profile=prof), torch


def _progress(i: int, obs: list, vis: list) -> None:
    """One line per observed frame, so a run cut off by --child-timeout still says how far it got and how fast."""
    print("PROGRESS " + json.dumps({"frames_done": i + 1, "observe_ms": round(obs[-1] * 1e3, 1),
                                    "vision_ms": round(vis[-1] * 1e3, 1)}), flush=True)


def _cut_off_row(stdout: str, timeout_s: float) -> dict:
    """What a child that ran past the timeout had measured: frames observed and their median observe time."""
    import statistics

    prog = [json.loads(x[9:]) for x in stdout.splitlines() if x.startswith("PROGRESS ")]
    row = {"error": f"cut off after {timeout_s:.0f} s (--child-timeout) at {len(prog)} frames observed"}
    if prog:
        row.update(frames_done=prog[-1]["frames_done"],
                   observe_ms_so_far=round(statistics.median(p["observe_ms"] for p in prog), 1),
                   last_observe_ms=prog[-1]["observe_ms"], last_vision_ms=prog[-1]["vision_ms"])
    return row


def _profile(fn, top: int = 12) -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    rows = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 3), "calls": e.count} for e in rows]


def _chat_ids(proc, n_images: int, text: str):
    """Token ids + pixel inputs of one user turn with `n_images` frames (plain transformers path)."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return prompt


def run_plain(model, proc, method: str, n_frames: int, k_frames: int, questions: int, new_tokens: int):
    """Plain transformers: `dynamic_cache` = one DynamicCache over the whole stream (frames appended as they come);
    `reprefill_last_k` = per question, a fresh generate over the last k frames + the question."""
    import torch
    from PIL import Image
    from transformers import DynamicCache

    timer = Timer(vision_tower(model))
    tok = proc.tokenizer
    every = max(1, n_frames // questions)
    obs, vis, asks, decode, window = [], [], [], [], []
    cache, ids = DynamicCache(config=model.config), None
    kept = 0
    gen_kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, suppress_tokens=
                  tok.all_special_ids, return_dict_in_generate=True)
    with torch.inference_mode():
        for i, f in enumerate(frames(n_frames)):
            img = Image.fromarray(f)
            v0, t0 = timer.total, time.perf_counter()
            if method == "dynamic_cache":
                enc = proc(text=[_chat_ids(proc, 1, f"frame {i}")], images=[[img]],
                           return_tensors="pt")
                new = enc.pop("input_ids")
                enc.pop("attention_mask", None)
                ids = new if ids is None else torch.cat([ids, new], 1)
                out = model(input_ids=new, cache=cache, use_cache=True, logits_to_keep=1, **enc)
                cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            else:
                window = (window + [img])[-k_frames:]
            obs.append(time.perf_counter() - t0)
            vis.append(timer.total - v0)
            _progress(i, obs, vis)
            if (i + 1) % every == 0:
                t0 = time.perf_counter()
                if method == "dynamic_cache":
                    q = proc.tokenizer(_chat_ids(proc, 0, "What changed?") , return_tensors="pt",
                                       add_special_tokens=False)["input_ids"]
                    full = torch.cat([ids, q], 1)
                    out = model.generate(input_ids=full, attention_mask=torch.ones_like(full), cache=cache, **gen_kw)
                    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
                    ids = out.sequences
                else:
                    enc = proc(text=[_chat_ids(proc, len(window), "What changed?")], images=[window],
                               return_tensors="pt")
                    out = model.generate(**enc, **gen_kw)
                lat = time.perf_counter() - t0
                asks.append(lat)
                kept = out.sequences.shape[1]
                t1 = time.perf_counter()  # one more decode step, timed alone
                c = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
                model(input_ids=out.sequences[:, -1:], cache=c, use_cache=True, logits_to_keep=1)
                decode.append(time.perf_counter() - t1)
    return dict(obs=obs, vis=vis, asks=asks, decode=decode, kept_tokens=kept, kv_bytes=None, tokens_per_frame=None,
                profile={})


def _rss_mib(field: str = "VmRSS") -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def _reset_peak_rss() -> bool:
    """Set this process's VmHWM to its current RSS (Linux clear_refs 5), so the peak excludes model building
    (random init briefly holds about twice the weights)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """This process image's peak RSS. Not ru_maxrss: that survives fork + exec and so holds the parent's peak
    (its 2 GiB bandwidth buffers)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child(args) -> dict:
    """One (shape, method, frames) run in this process; prints one JSON line."""
    import gc
    import statistics

    import torch

    torch.set_num_threads(args.threads)
    model, proc = build(args.shape, args.text_layers, args.vision_layers)
    gc.collect()
    rss_built = _rss_mib()
    peak_source = "VmHWM after build" if _reset_peak_rss() else "VmHWM"
    if args.method in ("saddle", "streaming_llm"):
        r, _ = run_session(model, proc, args.method, args.frames, args.budget, args.questions, args.new_tokens,
                           args.profile)
    else:
        r = run_plain(model, proc, args.method, args.frames, args.k_frames, args.questions, args.new_tokens)
    med = statistics.median
    cfg = model.config.get_text_config()
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * getattr(
        cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) * 4
    kept_kv = r["kept_tokens"] * kv_per_token
    out = dict(shape=args.shape, method=args.method, frames=args.frames,
               observe_ms=round(med(r["obs"]) * 1e3, 1), vision_ms=round(med(r["vis"]) * 1e3, 1),
               prefill_ms=round((med(r["obs"]) - med(r["vis"])) * 1e3, 1),
               decode_ms_per_token=round(med(r["decode"]) * 1e3, 2), question_ms=round(med(r["asks"]) * 1e3, 1),
               peak_rss_mib=_peak_rss_mib(), peak_rss_source=peak_source, rss_after_build_mib=rss_built,
               kept_tokens=r["kept_tokens"], kept_kv_bytes=kept_kv, tokens_per_frame=r["tokens_per_frame"],
               weight_bytes=_weight_bytes(model), decode_weight_bytes=_text_weight_bytes(model), profile=r["profile"])
    print("RESULT " + json.dumps(out), flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="infmllm-bench real-size", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="smolvlm_256m,qwen2_vl_2b")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--frames", default="8,32,128", help="stream lengths (the full default: ~40 min on 2 cores)")
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--vision-layers", type=int, default=1)
    p.add_argument("--budget", type=int, default=512, help="session KV budget in tokens")
    p.add_argument("--k-frames", type=int, default=4, help="frames the re-prefill baseline keeps")
    p.add_argument("--questions", type=int, default=4, help="questions per stream (evenly spaced, the last at the end)")
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: 2 threads stall on a shared 2-core machine, decode 130 vs 37 ms seen)")
    p.add_argument("--child-timeout", type=float, default=1800.0,
                   help="seconds one (shape, method, frames) run may take; past it the row records how far it got")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT / "real_size.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args(argv)
    if args.child:
        args.frames = int(args.frames)
        child(args)
        return 0
    import torch

    torch.set_num_threads(args.threads)  # the bandwidth copy runs on as many threads as the children's decode
    bandwidth = measure_bandwidth()
    print(f"memory bandwidth (copy): {bandwidth:.1f} GB/s", flush=True)
    command = "infmllm-bench real-size " + " ".join(argv if argv is not None else sys.argv[1:])
    result = dict(bench="real-size", kind="real_size", command=command.strip(), machine=machine(),
                  memory_gib=round(common.memory_gib() or 0, 1), commit=git_commit(),
                  bandwidth_gb_s=round(bandwidth, 2), complete=False,
                  args={k: v for k, v in vars(args).items() if k not in ("out",)}, rows=[])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.frames.split(",")]
    for shape in args.shapes.split(","):
        for n in lengths:
            for method in args.methods.split(","):
                cmd = [sys.executable, "-m", "infmllm_ros.bench.real_size", "--child", "--shape", shape,
                       "--method", method, "--frames", str(n), "--text-layers", str(args.text_layers),
                       "--vision-layers", str(args.vision_layers), "--budget", str(args.budget),
                       "--k-frames", str(args.k_frames), "--questions", str(args.questions),
                       "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
                if method == "saddle" and n == max(lengths):
                    cmd.append("--profile")
                t0 = time.perf_counter()
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
                    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                    if proc.returncode or not line:
                        row = dict(error=(proc.stderr or proc.stdout)[-800:])
                    else:
                        row = json.loads(line[-1][7:])
                        limit_s = (row["decode_weight_bytes"] + row["kept_kv_bytes"]) / (bandwidth * 1e9)
                        row["bandwidth_limit_ms"] = round(limit_s * 1e3, 2)
                        row["decode_over_limit"] = round(row["decode_ms_per_token"] / 1e3 / limit_s, 2)
                except subprocess.TimeoutExpired as e:
                    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                    row = _cut_off_row(out, args.child_timeout)
                row = dict(dict(shape=shape, method=method, frames=n), **row)
                row["wall_s"] = round(time.perf_counter() - t0, 1)
                print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
                result["rows"].append(row)
                args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")  # a cut run keeps its rows
    result["complete"] = True
    result["load_avg_end"] = round(os.getloadavg()[0], 2)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""gpu-check: the measurements that need a GPU, as one prepared script (`make gpu-check`, under 8 minutes).

1. kernels: the dispatched kernels (Triton on CUDA) against independent fp64 formulas, and against their torch
   references, in fp32 / bf16 / fp16 on real shapes (28 query heads / 4 KV heads, head_dim 128, 8K stored tokens;
   windows of 32 queries and of a whole 576-token frame; one decode query with raw column sums);
2. stream: 1M tokens through a real-size random-weight text model (Qwen2.5-7B widths) on the bounded cache:
   tokens/s and torch.cuda.max_memory_allocated at 4K / 64K / 1M tokens (flat = bounded);
3. decode: one decode step's time against (weight bytes + kept KV bytes) / measured HBM bandwidth;
4. layer scaling: end_chunk time and aten op count at 4 / 16 / 32 layers (goal: 32 / 4 layers <= 2);
5. prefill breakdown: one chunk of a 4-layer model at the stream's widths, bounded saddle (whole-chunk window)
   vs streaming_llm (no scores) vs plain transformers (SDPA + DynamicCache), and the window-score kernel alone
   (dispatched vs torch reference): where a bounded prefill chunk's time goes.

Writes a json (default docs/bench/gpu_check.json). Without CUDA it prints why and exits 0 having written nothing,
unless `--device cpu` is asked for: `--tiny --device cpu` runs every part at toy size (the smoke test).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from infmllm_ros.bench import common

REAL = dict(heads=28, kv_heads=4, head_dim=128, stored=8192, windows=(32, 576), layers=28, hidden=3584,
            intermediate=18944, vocab=152064, tokens=1 << 20, marks=(4096, 65536, 1 << 20), chunk=2048,
            budget=4096, decode_steps=32, copy_mib=2048)  # fmt: skip
TINY = dict(heads=4, kv_heads=2, head_dim=16, stored=128, windows=(8, 40), layers=2, hidden=64, intermediate=128,
            vocab=256, tokens=1024, marks=(256, 512, 1024), chunk=64, budget=128, decode_steps=4, copy_mib=16)
DTYPES = ("float32", "bfloat16", "float16")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- kernels


def dense_scores_fp64(q, k, scaling, normalize):
    """The textbook window scores at fp64 (full W x N softmax, causal with the chunk offset, GQA mean)."""
    b, hq, w, _ = q.shape
    hkv, n = k.shape[1], k.shape[2]
    s = (q.double() @ k.double().repeat_interleave(hq // hkv, 1).transpose(-1, -2)) * scaling
    i = torch.arange(w, device=q.device)[:, None] + n - w
    j = torch.arange(n, device=q.device)[None, :]
    col = s.masked_fill(j > i, float("-inf")).softmax(-1).sum(-2).view(b, hkv, hq // hkv, n).mean(2)
    return col / (j[0] <= i).sum(0).double() if normalize else col


def rotate_fp64(x, delta, inv_freq):
    f = inv_freq.numel()
    ang = delta.double()[..., None] * inv_freq.double()
    x = x.double()
    x1, x2 = x[..., :f], x[..., f : 2 * f]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin(), x[..., 2 * f :]], -1)


def check_kernels(device, shapes, dtypes=DTYPES) -> list[dict]:
    from infmllm_ros.kernels import window_scores, window_scores_ref
    from infmllm_ros.kernels.dispatch import triton_ok

    impl = "triton" if device.type == "cuda" and triton_ok() else "torch"
    hq, hkv, d, n = shapes["heads"], shapes["kv_heads"], shapes["head_dim"], shapes["stored"]
    g = torch.Generator(device).manual_seed(0)
    rows = []
    for name in dtypes:
        dt = getattr(torch, name)
        for w, normalize in [(w, True) for w in shapes["windows"]] + [(1, False)]:
            q = torch.randn(1, hq, w, d, device=device, generator=g).to(dt)
            k = torch.randn(1, hkv, n, d, device=device, generator=g).to(dt)
            got = window_scores(q, k, d**-0.5, normalize)
            want = dense_scores_fp64(q, k, d**-0.5, normalize)
            ref = window_scores_ref(q, k, d**-0.5, normalize)
            scale = want.abs().max().item()
            err, err_ref = (got.double() - want).abs().max().item(), (got - ref).abs().max().item()
            rows.append(dict(kernel="window_scores", impl=impl, dtype=name, window=w, normalize=normalize,
                             stored=n, max_abs_err=err, max_abs_err_vs_torch_ref=err_ref, scale=scale,
                             ok=err <= 1e-5 * max(scale, 1.0)))  # fmt: skip
        rows += check_moves(device, dt, name, shapes, g, impl)
    return rows


def check_moves(device, dt, name: str, shapes: dict, g, impl: str) -> list[dict]:
    """Compaction and key rotation: half of the slots kept and moved to the front, keys turned by delta = new - old
    position (up to -stored/2). ok: the kernel equals its torch reference to one rounding of the dtype and moves
    values exactly. The fp64 error is reported, not judged: kernel and reference both take the angle
    delta * inv_freq in fp32, which at |delta| ~ 4K is off by ~1e-4 rad."""
    from infmllm_ros import kernels

    hkv, d, cap = shapes["kv_heads"], shapes["head_dim"], shapes["stored"]
    r, m = hkv * shapes["layers"], cap // 2  # one call compacts every layer's rows
    kk = torch.randn(r, cap, d, device=device, generator=g).to(dt)
    vv = torch.randn(r, cap, d, device=device, generator=g).to(dt)
    keep = torch.stack([torch.randperm(cap, device=device, generator=g)[:m].sort().values for _ in range(r)])
    delta = -torch.randint(0, cap // 2, (r, m), device=device, generator=g)
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=device).float() / d))
    idx = keep[..., None].expand(-1, -1, d)
    want_k = rotate_fp64(kk.gather(1, idx), delta, inv)
    bound = 2 * torch.finfo(dt).eps * want_k.abs().max().item() + 1e-6  # one rounding to the dtype
    k2, v2, rows = kk.clone(), vv.clone(), []
    kernels.compact_(k2, v2, keep)  # moves only; keys are rotated when they are read
    moved = bool(torch.equal(k2[:, :m], kk.gather(1, idx)) and torch.equal(v2[:, :m], vv.gather(1, idx)))
    rows.append(dict(kernel="compact", impl=impl, dtype=name, rows=r, kept=m, slots=cap,
                     max_abs_err=0.0 if moved else float("inf"), ok=moved))  # fmt: skip
    got, ref = kernels.rotate_keys(k2[:, :m], delta, inv), kernels.rotate_keys_ref(k2[:, :m], delta, inv)
    kernel = "rotate_keys"
    err = (got.double() - ref.double()).abs().max().item()
    rows.append(dict(kernel=kernel, impl=impl, dtype=name, rows=r, kept=m, slots=cap, max_abs_err=err,
                     max_abs_err_vs_fp64=(got.double() - want_k).abs().max().item(), one_rounding=bound,
                     values_moved_exactly=moved, ok=err <= bound and moved))  # fmt: skip
    # M-RoPE: each t/h/w row moved by its own delta (the bound's row-by-row squeeze), each section turned by its row
    f = d // 2
    sections = [f // 4, f - f // 4 - (f - f // 4) // 2, (f - f // 4) // 2]  # Qwen2-VL's 16/24/24 at head_dim 128
    freq_rows = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sections)]).to(device)
    delta3 = -torch.randint(0, cap // 2, (r, m, 3), device=device, generator=g)
    ang = delta3[..., freq_rows].double() * inv.double()
    x1, x2 = kk.gather(1, idx).double().split(f, -1)
    want3 = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
    got = kernels.rotate_keys(k2[:, :m], delta3, inv, freq_rows)
    err = (got.double() - kernels.rotate_keys_ref(k2[:, :m], delta3, inv, freq_rows).double()).abs().max().item()
    rows.append(dict(kernel=kernel, impl=f"{impl}, M-RoPE rows", dtype=name, rows=r, kept=m, slots=cap,
                     max_abs_err=err, max_abs_err_vs_fp64=(got.double() - want3).abs().max().item(),
                     one_rounding=bound, values_moved_exactly=moved, ok=err <= bound and moved))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------- stream + decode


def random_text_model(shapes, device, dtype):
    """Qwen2 with the given widths and random weights (nothing downloaded)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=shapes["vocab"], hidden_size=shapes["hidden"],
                      intermediate_size=shapes["intermediate"], num_hidden_layers=shapes["layers"],
                      num_attention_heads=shapes["heads"], num_key_value_heads=shapes["kv_heads"],
                      head_dim=shapes["head_dim"], max_position_embeddings=32768, rope_theta=1e6,
                      tie_word_embeddings=False)  # fmt: skip
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def peak_memory(device) -> dict:
    if device.type == "cuda":
        return {"max_memory_allocated": torch.cuda.max_memory_allocated(device)}
    return {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # CPU: the process peak


def forward(model, cache, ids, prefill: bool):
    pos = (cache.next_position + torch.arange(ids.shape[1], device=ids.device)).unsqueeze(0)
    cache.begin_forward(pos, prefill=prefill)
    out = model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1,
                **cache.forward_kwargs())  # fmt: skip
    if prefill:
        cache.end_chunk()
    return out.logits[:, -1]


def hbm_bandwidth(device, mib: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    x = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * reps / (time.perf_counter() - t)


def run_stream(device, dtype, shapes, time_limit_s: float, log=print) -> dict:
    from infmllm_ros.bench import policies
    from infmllm_ros.cache import BoundedCache, CacheConfig

    model = random_text_model(shapes, device, dtype)
    policies.prepare(model)
    chunk, steps = shapes["chunk"], shapes["decode_steps"]
    cfg = CacheConfig(policy="saddle", budget=shapes["budget"], recent=shapes["budget"] // 8, window=0, sinks=4,
                      max_chunk=chunk, max_new_tokens=steps + 1)  # fmt: skip
    cache = BoundedCache(cfg, model.config, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator(device).manual_seed(0)
    marks, points, fed, stopped = list(shapes["marks"]), [], 0, None
    t_start = t_last = time.perf_counter()
    last_fed = 0
    with torch.inference_mode():
        while fed < shapes["tokens"]:
            ids = torch.randint(0, shapes["vocab"], (1, chunk), device=device, generator=g)
            logits = forward(model, cache, ids, prefill=True)
            fed += chunk
            if marks and fed >= marks[0]:
                sync(device)
                now = time.perf_counter()
                points.append(dict(tokens=fed, seconds=round(now - t_start, 3),
                                   tokens_per_s=round((fed - last_fed) / (now - t_last), 1), stored=cache.stored,
                                   next_position=cache.next_position, evictions=cache.evictions,
                                   finite=bool(torch.isfinite(logits).all()), **peak_memory(device)))  # fmt: skip
                log(f"  stream: {points[-1]}")
                t_last, last_fed = now, fed
                marks.pop(0)
            if time.perf_counter() - t_start > time_limit_s:
                stopped = f"time limit {time_limit_s:g} s reached at {fed} tokens"
                break
        # decode after the stream: one token at a time, no eviction
        tok = logits.argmax(-1, keepdim=True)
        times = []
        for _ in range(steps):
            sync(device)
            t = time.perf_counter()
            tok = forward(model, cache, tok, prefill=False).argmax(-1, keepdim=True)
            sync(device)
            times.append(time.perf_counter() - t)
    times.sort()
    step = times[len(times) // 2]
    elem = torch.empty((), dtype=dtype).element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = 2 * shapes["layers"] * shapes["kv_heads"] * cache.stored * shapes["head_dim"] * elem
    bw = hbm_bandwidth(device, shapes["copy_mib"])
    bound = (weight_bytes + kv_bytes) / bw
    return dict(model=dict(family="qwen2 (random weights)", parameters=sum(p.numel() for p in model.parameters()),
                           **{k: shapes[k] for k in ("layers", "hidden", "heads", "kv_heads", "head_dim", "vocab")}),
                cache=dict(budget=cfg.budget, recent=cfg.recent, sinks=cfg.sinks, window=cfg.window,
                           max_chunk=chunk, capacity=cfg.capacity),
                points=points, stopped_early=stopped,
                decode=dict(steps=steps, median_step_s=step, min_step_s=times[0], weight_bytes=weight_bytes,
                            kept_kv_bytes=kv_bytes, copy_bandwidth_bytes_per_s=bw, bandwidth_bound_s=bound,
                            step_over_bound=step / bound))  # fmt: skip


def _timed(device, fn, reps: int) -> float:
    fn()  # warm-up (Triton compiles, allocator)
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def prefill_breakdown(device, dtype, shapes, reps: int = 3) -> dict:
    """Milliseconds per prefill chunk of the same model three ways, and of the window-score kernel alone at the
    shape that chunk scores (all heads, whole chunk as window, budget + chunk keys)."""
    from transformers import DynamicCache

    from infmllm_ros import kernels
    from infmllm_ros.bench import policies
    from infmllm_ros.cache import BoundedCache, CacheConfig

    sh = dict(shapes, layers=min(4, shapes["layers"]))
    model = random_text_model(sh, device, dtype)
    chunk, budget, g = sh["chunk"], sh["budget"], torch.Generator(device).manual_seed(1)

    def ids():
        return torch.randint(0, sh["vocab"], (1, chunk), device=device, generator=g)

    out = dict(layers=sh["layers"], chunk=chunk, budget=budget, reps=reps)
    with torch.inference_mode():
        policies.prepare(model)
        for name, policy in (("saddle_ms", "saddle"), ("streaming_llm_ms", "streaming_llm")):
            cfg = CacheConfig(policy=policy, budget=budget, recent=budget // 8, window=0, sinks=4, max_chunk=chunk,
                              max_new_tokens=1)  # fmt: skip
            cache = BoundedCache(cfg, model.config, device, dtype)
            for _ in range(budget // chunk + 1):  # fill to the budget: every timed chunk evicts
                forward(model, cache, ids(), prefill=True)
            out[name] = 1e3 * _timed(device, lambda c=cache: forward(model, c, ids(), prefill=True), reps)
        model.set_attn_implementation("sdpa")
        past = budget  # plain transformers over the same context length: budget cached + one chunk

        def plain():
            dc = DynamicCache(config=model.config)
            model(input_ids=torch.randint(0, sh["vocab"], (1, past), device=device, generator=g),
                  cache=dc, use_cache=True, logits_to_keep=1)  # fmt: skip
            sync(device)
            t = time.perf_counter()
            pos = torch.arange(past, past + chunk, device=device)[None]
            model(input_ids=ids(), position_ids=pos, cache=dc, use_cache=True, logits_to_keep=1)
            sync(device)
            return time.perf_counter() - t

        plain()
        out["plain_sdpa_ms"] = 1e3 * sorted(plain() for _ in range(reps))[reps // 2]
        q = torch.randn(1, sh["heads"], chunk, sh["head_dim"], device=device, generator=g).to(dtype)
        k = torch.randn(1, sh["kv_heads"], budget + chunk, sh["head_dim"], device=device, generator=g).to(dtype)
        scale = sh["head_dim"] ** -0.5
        out["window_scores_ms"] = 1e3 * _timed(device, lambda: kernels.window_scores(q, k, scale), reps)
        out["window_scores_ref_ms"] = 1e3 * _timed(device, lambda: kernels.window_scores_ref(q, k, scale), reps)
    out["saddle_over_plain"] = out["saddle_ms"] / out["plain_sdpa_ms"]
    return out


# ----------------------------------------------------------------------------------------------- layer scaling


def layer_scaling(device, dtype, tiny: bool) -> list[dict]:
    """Issue 12 item 5 on the GPU: end_chunk time and aten op count at 4 / 16 / 32 layers (cache_cost's measurement;
    goal 32-layer / 4-layer time <= 2: on a GPU an eviction is launch-bound, on a CPU memory-traffic-bound)."""
    from types import SimpleNamespace

    from infmllm_ros.bench import cache_cost

    args = SimpleNamespace(budget=32 if tiny else 1024, chunk=16 if tiny else 256, recent=8 if tiny else 128,
                           window=0, sinks=4)
    return cache_cost.layer_scaling(args, device, dtype)


# -------------------------------------------------------------------------------------------------------- CLI


def parse(argv):
    p = argparse.ArgumentParser(prog="infmllm-bench gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes (the CPU smoke test)")
    p.add_argument("--dtype", default="auto", help="stream dtype: auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tokens", type=int, default=None, help="stream length (default 1M; --tiny 1024)")
    p.add_argument("--stream-time-limit", type=float, default=300.0, help="stop the stream after this many s")
    p.add_argument("--skip-stream", action="store_true")
    p.add_argument("--skip-layer-scaling", action="store_true")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--out", default=str(common.DEFAULT_OUT / "gpu_check.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: skipped, no CUDA device here (run it on a GPU machine; `--tiny --device cpu` is the "
              "CPU smoke test)")
        return 0
    shapes = dict(TINY if a.tiny else REAL)
    if a.tokens:
        shapes["tokens"] = a.tokens
        shapes["marks"] = tuple(m for m in shapes["marks"] if m < a.tokens) + (a.tokens,)
    dtype = getattr(torch, a.dtype) if a.dtype != "auto" else (torch.bfloat16 if device.type == "cuda"
                                                                else torch.float32)  # fmt: skip
    t0 = time.perf_counter()
    m = common.machine()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    res = dict(kind="gpu_check", device=str(device), device_name=name, tiny=a.tiny,
               dtype=str(dtype).replace("torch.", ""), machine=m, commit=common.git_commit(),
               command=common.command_line(["gpu-check", *argv]))
    res["kernels"] = check_kernels(device, shapes)
    for r in res["kernels"]:
        print(f"  {r['kernel']} {r['impl']} {r['dtype']}: max err {r['max_abs_err']:.2e} ok={r['ok']}")
    if not a.skip_prefill:  # quick, before the stream: where a chunk's time goes
        res["prefill"] = prefill_breakdown(device, dtype, shapes)
        print(f"  prefill: {res['prefill']}")
    if not a.skip_stream:
        res["stream"] = run_stream(device, dtype, shapes, a.stream_time_limit)
        d = res["stream"]["decode"]
        print(f"  decode step {1e3 * d['median_step_s']:.2f} ms vs bandwidth bound {1e3 * d['bandwidth_bound_s']:.2f}"
              f" ms (x{d['step_over_bound']:.2f})")
    if not a.skip_layer_scaling:
        res["layer_scaling"] = layer_scaling(device, dtype, a.tiny)
    res["ok"] = all(r["ok"] for r in res["kernels"]) and all(
        p["finite"] for p in res.get("stream", {}).get("points", []))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"gpu-check: {'ok' if res['ok'] else 'MISMATCH'} in {res['seconds']} s; wrote {out}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

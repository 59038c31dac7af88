"""Run by test_kernels.py in a subprocess: TRITON_INTERPRET=1 must be set before triton is imported.
Compares each Triton kernel with its torch reference; exits non-zero on the first mismatch."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from infmllm_ros.kernels import compact_ref, rotate_keys_ref, window_scores_ref  # noqa: E402
from infmllm_ros.kernels.compact_triton import compact_triton  # noqa: E402
from infmllm_ros.kernels.rotate_triton import rotate_keys_triton  # noqa: E402
from infmllm_ros.kernels.window_scores_triton import window_scores_triton  # noqa: E402


def check_window_scores():
    # (H_q, H_kv, W, N, D, normalize): GQA 1/2/3/4, window = whole chunk, single decode query, odd sizes,
    # N past one key block, offsets 0..40; 28/4 heads (GQA 7) with a whole-chunk window
    cases = [(4, 2, 5, 37, 16, True), (4, 4, 1, 20, 8, False), (6, 2, 17, 17, 12, True), (8, 2, 3, 45, 16, True),
             (3, 1, 7, 40, 10, False), (4, 1, 33, 70, 16, True),
             (28, 4, 24, 90, 32, True), (7, 1, 40, 40, 16, True)]  # fmt: skip
    for hq, hkv, w, n, d, norm in cases:
        q, k = torch.randn(1, hq, w, d), torch.randn(1, hkv, n, d)
        want, got = window_scores_ref(q, k, d**-0.5, norm), window_scores_triton(q, k, d**-0.5, norm)
        err = (want - got).abs().max().item()
        print(f"window_scores Hq={hq} Hkv={hkv} W={w} N={n} D={d} norm={norm}: max err {err:.2e}")
        assert err < 1e-5, err
    # 16-bit inputs go into the dot as they are (tensor cores, fp32 accumulator, wider tiles when W > 16): products
    # of bf16/fp16 values are exact in fp32, so the fp32 reference of the same values agrees but for summation order
    for dt, (hq, hkv, w, n, d, norm) in [(torch.bfloat16, (28, 4, 40, 150, 32, True)),
                                         (torch.float16, (4, 2, 70, 130, 16, True)),
                                         (torch.bfloat16, (4, 2, 1, 90, 16, False)),
                                         (torch.float16, (6, 3, 12, 12, 16, True))]:  # fmt: skip
        q, k = torch.randn(1, hq, w, d).to(dt), torch.randn(1, hkv, n, d).to(dt)
        want, got = window_scores_ref(q, k, d**-0.5, norm), window_scores_triton(q, k, d**-0.5, norm)
        err = (want - got).abs().max().item()
        print(f"window_scores {dt} Hq={hq} Hkv={hkv} W={w} N={n}: max err {err:.2e}")
        assert got.dtype == torch.float32 and err < 1e-5, err
    # a non-contiguous query (the last W rows of a chunk, as the attention function passes it)
    q, k = torch.randn(1, 4, 11, 16), torch.randn(1, 2, 30, 16)
    err = (window_scores_ref(q[:, :, -5:], k, 0.25) - window_scores_triton(q[:, :, -5:], k, 0.25)).abs().max().item()
    assert err < 1e-5, err


def check_compact():
    for h, cap, d, m in [(2, 50, 16, 23), (3, 40, 12, 40), (1, 70, 8, 33), (8, 90, 16, 65)]:  # h: layers x heads
        k, v = torch.randn(h, cap, d), torch.randn(h, cap, d)
        keep = torch.stack([torch.randperm(cap)[:m].sort().values for _ in range(h)])
        k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
        compact_ref(k1, v1, keep)
        compact_triton(k2, v2, keep)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)  # a pure move: bit for bit
        assert torch.equal(k1[:, m:], k[:, m:])  # slots past the kept ones are untouched
        print(f"compact H={h} cap={cap} D={d} m={m}: equal")


def check_rotate():
    for h, n, d, f, dtype in [(2, 37, 16, 8, torch.float32), (3, 70, 12, 4, torch.float32),
                              (2, 45, 16, 8, torch.bfloat16), (1, 33, 16, 6, torch.float16)]:  # fmt: skip
        k = torch.randn(h, 2 * n, d).to(dtype)[:, ::2]  # non-contiguous, as a buffer slice can be
        delta = -torch.randint(0, 1000, (h, n))
        inv = 1 / (10000 ** (torch.arange(0, 2 * f, 2).float() / (2 * f)))
        want, got = rotate_keys_ref(k, delta, inv), rotate_keys_triton(k, delta, inv)
        err = (want.float() - got.float()).abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # at most one rounding step apart in 16-bit dtypes
        print(f"rotate H={h} n={n} D={d} rotary={2 * f} {dtype}: max err {err:.2e}")
        assert err < tol, err


def check_rotate_rows():
    """Per-row (M-RoPE) offsets: the kernel against Qwen2-VL's own rotary applied directly at the target positions
    in fp64 (within 2x of the model's own computation there), and against the torch reference."""
    from cache_helpers import qwen2vl_rope, qwen2vl_rope_model
    from transformers import Qwen2VLTextConfig

    from infmllm_ros.cache.rope import freq_rows_of, inv_freq_from_config

    for sections, n, dtype in [((8, 12, 12), 45, torch.float32), ((2, 3, 3), 37, torch.float32),
                               ((8, 12, 12), 33, torch.bfloat16), ((4, 6, 6), 20, torch.float16)]:  # fmt: skip
        d = 2 * sum(sections)
        cfg = Qwen2VLTextConfig(hidden_size=4 * d, num_attention_heads=4, num_key_value_heads=2,
                                rope_parameters={"rope_type": "default", "mrope_section": list(sections),
                                                 "rope_theta": 1e4})  # fmt: skip
        inv, rows = inv_freq_from_config(cfg), freq_rows_of(list(sections))
        x = torch.randn(2, n, d, dtype=torch.float64)
        start = torch.randint(0, 600, (n, 3))
        offset = torch.zeros(2, n + 7, 3, dtype=torch.long)  # a slice of a larger buffer, as the cache passes it
        offset[:, :n] = -torch.randint(0, 500, (2, n, 3))
        delta = offset[:, :n]
        stored = torch.stack([qwen2vl_rope_model(x[h : h + 1].to(dtype), start, cfg)[0] for h in range(2)])
        truth = qwen2vl_rope(x, start + delta, cfg)
        direct = torch.stack([qwen2vl_rope_model(x[h : h + 1].to(dtype), start + delta[h], cfg)[0] for h in range(2)])
        got, ref = rotate_keys_triton(stored, delta, inv, rows), rotate_keys_ref(stored, delta, inv, rows)
        err, err_direct = (got.double() - truth).abs().max().item(), (direct.double() - truth).abs().max().item()
        vs_ref = (got.float() - ref.float()).abs().max().item()
        print(
            f"rotate rows sections={sections} n={n} {dtype}: err vs fp64 model rotary {err:.2e} "
            f"(model direct {err_direct:.2e}), vs torch ref {vs_ref:.2e}"
        )
        if dtype == torch.float32:  # the stored key's and the turn's fp32 angles (positions < 1100) both carry rounding
            assert err < 3e-4, err
        else:  # 16-bit: one rounding of the result dominates, as for the model's own key there
            assert err <= 2 * err_direct, (err, err_direct)
        assert vs_ref < (1e-5 if dtype == torch.float32 else 2e-2), vs_ref


if __name__ == "__main__":
    torch.manual_seed(0)
    check_window_scores()
    check_compact()
    check_rotate()
    check_rotate_rows()
    print("ok")
    sys.exit(0)

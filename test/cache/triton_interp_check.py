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


if __name__ == "__main__":
    torch.manual_seed(0)
    check_window_scores()
    check_compact()
    check_rotate()
    print("ok")
    sys.exit(0)

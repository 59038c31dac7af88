"""Run by test_kernels.py in a subprocess: TRITON_INTERPRET=1 must be set before triton is imported.
Compares each Triton kernel with its torch reference; exits non-zero on the first mismatch."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from infmllm_ros.kernels import compact_rerotate_ref, window_scores_ref  # noqa: E402
from infmllm_ros.kernels.compact_triton import compact_rerotate_triton  # noqa: E402
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
    for h, cap, d, f, m in [(2, 50, 16, 8, 23), (3, 40, 12, 4, 40), (1, 70, 8, 0, 33), (2, 90, 16, 6, 65)]:
        k, v = torch.randn(h, cap, d), torch.randn(h, cap, d)
        keep = torch.stack([torch.randperm(cap)[:m].sort().values for _ in range(h)])
        delta = -torch.randint(0, 1000, (h, m))
        inv = None if f == 0 else 1 / (10000 ** (torch.arange(0, 2 * f, 2).float() / (2 * f)))
        k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
        compact_rerotate_ref(k1, v1, keep, delta, inv)
        compact_rerotate_triton(k2, v2, keep, delta, inv)
        err = max((k1 - k2).abs().max().item(), (v1 - v2).abs().max().item())
        print(f"compact H={h} cap={cap} D={d} rotary={2 * f} m={m}: max err {err:.2e}")
        assert err < 1e-5, err
        assert torch.equal(k1[:, m:], k[:, m:])  # slots past the kept ones are untouched


if __name__ == "__main__":
    torch.manual_seed(0)
    check_window_scores()
    check_compact()
    print("ok")
    sys.exit(0)

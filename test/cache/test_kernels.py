"""Check of truth 5: Triton kernels == their torch references (TRITON_INTERPRET=1 on CPU, in a subprocess),
and the torch references == a plain, independent computation."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from infmllm_ros.kernels import compact_ref, rotate_keys_ref, window_counts, window_scores_ref


def test_triton_kernels_match_references_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_interp_check.py"))], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("ok")


def test_window_scores_reference_by_loops():
    """Inf-MLLM 'Sum & Average', written out query by query, key by key."""
    torch.manual_seed(0)
    hq, hkv, w, n, d = 4, 2, 3, 7, 8
    q, k = torch.randn(1, hq, w, d), torch.randn(1, hkv, n, d)
    want = torch.zeros(hkv, n)
    for h in range(hq):
        for i in range(w):
            row = n - w + i  # the query's own index among the keys
            p = torch.softmax(torch.stack([q[0, h, i] @ k[0, h // 2, j] * 0.3 for j in range(row + 1)]), 0)
            for j in range(row + 1):
                seen_by = sum(1 for i2 in range(w) if n - w + i2 >= j)
                want[h // 2, j] += p[j] / seen_by / (hq // hkv)
    assert (window_scores_ref(q, k, 0.3)[0] - want).abs().max().item() < 1e-6
    assert window_counts(w, n, "cpu").tolist() == [3, 3, 3, 3, 3, 2, 1]


def test_compact_reference_moves():
    k = torch.arange(2 * 6 * 4, dtype=torch.float32).view(2, 6, 4)
    v = -k.clone()
    keep = torch.tensor([[1, 4], [0, 5]])
    k0 = k.clone()
    compact_ref(k, v, keep)
    assert torch.equal(k[0, :2], k0[0, [1, 4]]) and torch.equal(k[1, :2], k0[1, [0, 5]])
    assert torch.equal(v[1, :2], -k0[1, [0, 5]])
    assert torch.equal(k[:, 2:], k0[:, 2:])  # slots past the kept ones untouched


def test_rotate_reference_turns():
    x = torch.tensor([[[1.0, 0.0, 0.0, 0.0, 5.0], [1.0, 0.0, 0.0, 0.0, 5.0]]])  # 2 rotary pairs + 1 pass-through dim
    got = rotate_keys_ref(x, torch.tensor([[1, 0]]), torch.tensor([torch.pi / 2, 0.0]))
    assert torch.allclose(got[0, 0], torch.tensor([0.0, 0.0, 1.0, 0.0, 5.0]), atol=1e-6)  # (x1, x2) turned 90 deg
    assert torch.equal(got[0, 1], x[0, 1])  # delta 0: untouched, bit for bit

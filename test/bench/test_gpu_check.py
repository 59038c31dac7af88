"""The prepared GPU script at toy size on CPU: every part runs, the json says what the GPU run will say, the kernel
check can fail, and without CUDA the default run skips with a message (nothing written)."""

import json

import pytest
import torch

from infmllm_ros.bench import gpu_check, gpu_check_view


def test_tiny_cpu_run_writes_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--tiny", "--device", "cpu", "--tokens", "512", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ok"] and res["tiny"] and res["device"] == "cpu"
    names = {r["kernel"] for r in res["kernels"]}  # compact + rotate_keys (rotate-on-read)
    assert names - {"window_scores"} in ({"compact_rerotate"}, {"compact", "rotate_keys"}), names
    assert {(r["kernel"], r["dtype"]) for r in res["kernels"]} == {(k, d) for k in names for d in gpu_check.DTYPES}
    assert all(r["ok"] for r in res["kernels"])
    s = res["stream"]
    assert [p["tokens"] for p in s["points"]] == [256, 512]
    assert all(p["stored"] <= s["cache"]["budget"] and p["finite"] for p in s["points"])
    assert s["points"][-1]["evictions"] >= 2 and s["cache"]["window"] == 0
    d = s["decode"]
    assert d["median_step_s"] > 0 and d["copy_bandwidth_bytes_per_s"] > 0
    assert d["weight_bytes"] == 4 * s["model"]["parameters"]  # fp32 on CPU
    assert d["bandwidth_bound_s"] == (d["weight_bytes"] + d["kept_kv_bytes"]) / d["copy_bandwidth_bytes_per_s"]
    ls = res["layer_scaling"]  # issue 12 item 5 on the GPU: end_chunk at 4 / 16 / 32 layers
    assert sorted({(r["kv_heads"], r["layers"]) for r in ls}) == [(k, n) for k in (2, 8) for n in (4, 16, 32)]
    assert all(r["end_chunk_ms"] > 0 and r["ops"] > 0 and r["stored"] == 32 for r in ls)
    md = gpu_check_view.markdown(res)  # what docs/BENCHMARKS.md will show once the GPU run's json is in docs/bench
    assert md.count("| window_scores |") == 9 and "| 512 |" in md and "of the bound" in md
    assert "all within tolerance" in gpu_check_view.findings("g.json", res)[0]
    assert "| 8 | 32 |" in md and "32 layers / 4 layers" in gpu_check_view.findings("g.json", res)[-1]
    pre = res["prefill"]  # where a bounded prefill chunk's time goes, three ways on one model
    assert pre["layers"] == 2 and all(pre[k] > 0 for k in ("saddle_ms", "streaming_llm_ms", "plain_sdpa_ms",
                                                           "window_scores_ms", "window_scores_ref_ms"))
    assert pre["saddle_over_plain"] == pre["saddle_ms"] / pre["plain_sdpa_ms"] and "Prefill breakdown" in md
    assert "Note:" not in md and gpu_check_view.markdown({**res, "note": "ran on X"}).endswith("Note: ran on X\n")


def test_kernel_check_catches_a_wrong_kernel(monkeypatch):
    import infmllm_ros.kernels as kernels

    good = kernels.window_scores
    monkeypatch.setattr(kernels, "window_scores", lambda q, k, s, normalize=True: good(q, k, s, normalize) * 1.001)
    rows = gpu_check.check_kernels(torch.device("cpu"), gpu_check.TINY, ("float32",))
    assert not any(r["ok"] for r in rows if r["kernel"] == "window_scores")
    assert all(r["ok"] for r in rows if r["kernel"] != "window_scores")


def test_skips_cleanly_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    assert "skipped, no CUDA device" in capsys.readouterr().out
    assert not out.exists()


def test_triton_can_be_switched_off(monkeypatch):
    """INFMLLM_ROS_TRITON=0: every dispatch keeps the torch reference (one switch for all three kernels)."""
    from infmllm_ros.kernels import dispatch

    pytest.importorskip("triton")
    monkeypatch.delenv("INFMLLM_ROS_TRITON", raising=False)
    assert dispatch.triton_ok()
    monkeypatch.setenv("INFMLLM_ROS_TRITON", "0")
    assert not dispatch.triton_ok()

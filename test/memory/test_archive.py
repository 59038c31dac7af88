"""FrameArchive: byte bound, thinning keeps the far past, round trip within the quantization bound,
damaged pages detected, disk faults never raise, state()/open() round trip, recall ranking."""

import errno
import json
import os

import pytest
import torch

import infmllm_ros.memory.archive as archive_mod
from infmllm_ros.memory import FrameArchive
from infmllm_ros.memory.quant import quantize

L, H, D, N = 2, 2, 8, 4


def frame(i, n=N, rows=1):
    g = torch.Generator().manual_seed(1000 + i)
    k = torch.randn(L, H, n, D, generator=g)
    v = torch.randn(L, H, n, D, generator=g)
    pos = (torch.arange(n) + i * n).unsqueeze(1).expand(n, rows).contiguous()
    return k, v, pos


def files_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def test_bytes_per_frame_is_the_file_size(tmp_path):
    a = FrameArchive(tmp_path, 10**6, L, H, D, rows=3)
    k, v, pos = frame(0, n=5, rows=3)
    assert a.add(0, 0.0, k, v, pos)
    # hand count: 44-byte header (4 magic + 8 id + 5*4 shape + 8 length + 4 crc), int8 K and V,
    # one fp16 scale per (layer, head, channel) for each, int64 positions
    assert a.bytes_per_frame(5) == 44 + 2 * (L * H * 5 * D) + 2 * (L * H * D * 2) + 5 * 3 * 8
    assert files_bytes(tmp_path) == a.bytes_per_frame(5)


def test_bound_holds_and_thinning_keeps_far_past(tmp_path):
    per = FrameArchive(tmp_path, 1, L, H, D).bytes_per_frame(N)
    max_bytes = per * 40 + per // 2  # room for 40 frames
    a = FrameArchive(tmp_path, max_bytes, L, H, D)
    k, v, pos = frame(0)
    for i in range(2000):
        assert a.add(i, float(i), k, v, pos + i * N)
        assert files_bytes(tmp_path) <= max_bytes  # every file in the directory, headers and temp files included
    stamps = sorted(e.stamp for e in a.frames.values())
    assert len(stamps) == 40 and a.dropped == 1960
    assert stamps[0] == 0.0 and stamps[-1] == 1999.0  # the far past stays represented
    # evenly thinned: no gap is more than a few times the even spacing 1999 / 39, and the first quarter of the
    # stream keeps about a quarter of the frames (oldest-first dropping would keep none of it)
    gaps = [b - a_ for a_, b in zip(stamps, stamps[1:], strict=False)]
    assert max(gaps) <= 4 * 1999 / 39
    assert sum(s < 500 for s in stamps) >= 6


def test_get_within_quantization_bound(tmp_path):
    a = FrameArchive(tmp_path, 10**6, L, H, D, rows=3)
    added = {i: frame(i, n=3 + i, rows=3) for i in range(5)}
    for i, (k, v, pos) in added.items():
        assert a.add(i, 0.1 * i, k.to(torch.bfloat16), v, pos)
    for i, (k, v, pos) in added.items():
        gk, gv, gpos = a.get(i)
        for got, ref in ((gk, k.to(torch.bfloat16).float()), (gv, v)):
            bound = ref.abs().amax(dim=2, keepdim=True) / 127 * (1 + 2e-3) / 2 + 1e-7  # scale/2, fp16 scale step
            assert bool(((got - ref).abs() <= bound).all())
        assert torch.equal(gpos, pos)
    assert a.get(99) is None


def test_damaged_page_detected_and_skipped(tmp_path):
    a = FrameArchive(tmp_path, 10**6, L, H, D)
    for i in range(3):
        a.add(i, float(i), *frame(i))
    page = os.path.join(tmp_path, a.frames[1].file)
    with open(page, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    assert a.get(1) is None and a.damaged == 1
    assert 1 not in a.frames and 1 not in a.top(torch.randn(L, H, 1, D), 3)
    assert a.get(0) is not None and a.get(2) is not None and a.damaged == 1
    # a truncated page is damaged too
    with open(os.path.join(tmp_path, a.frames[2].file), "r+b") as f:
        f.truncate(20)
    assert a.get(2) is None and a.damaged == 2


def test_write_failure_stops_archiving_without_raising(tmp_path, monkeypatch):
    a = FrameArchive(tmp_path, 10**6, L, H, D)
    k0, v0, p0 = frame(0)
    assert a.add(0, 0.0, k0, v0, p0)

    def full_disk(path, data, fsync):
        with open(path, "wb") as f:
            f.write(data[:10])  # a partial page reaches the disk before the error
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(archive_mod, "_write_all", full_disk)
    assert a.add(1, 1.0, *frame(1)) is False
    assert a.write_errors == 1 and a.stopped and "No space" in a.stopped
    assert sorted(os.listdir(tmp_path)) == [a.frames[0].file]  # the partial temp page was removed
    monkeypatch.undo()
    assert a.add(2, 2.0, *frame(2)) is False and a.skipped == 1  # archiving stays stopped
    k, v, _ = a.get(0)
    _, scale = quantize(k0)
    assert bool(((k - k0).abs() <= scale.float() / 2 * (1 + 1e-5)).all())


def test_frame_larger_than_budget_is_skipped(tmp_path):
    a = FrameArchive(tmp_path, 100, L, H, D)
    assert a.add(0, 0.0, *frame(0)) is False and a.skipped == 1 and files_bytes(tmp_path) == 0


def test_state_open_round_trip(tmp_path):
    a = FrameArchive(tmp_path, 10**6, L, H, D, rows=3)
    for i in range(4):
        a.add(i, 0.5 * i, *frame(i, rows=3))
    state = json.loads(json.dumps(a.state()))  # JSON-able
    (tmp_path / "000000000077.kvp").write_bytes(b"orphan")  # a page written after the snapshot
    b = FrameArchive.open(tmp_path, state)
    assert list(b.frames) == list(a.frames) and b.used_bytes == a.used_bytes == files_bytes(tmp_path)
    q = torch.randn(L, 2 * H, 3, D)
    assert b.top(q, 4) == a.top(q, 4)
    for i in range(4):
        ea, eb = a.frames[i], b.frames[i]
        assert (ea.stamp, ea.n, ea.pos_min, ea.pos_max) == (eb.stamp, eb.n, eb.pos_min, eb.pos_max)
        assert torch.equal(ea.rep, eb.rep)
        for x, y in zip(a.get(i), b.get(i), strict=True):
            assert torch.equal(x, y)
    with pytest.raises(ValueError):
        FrameArchive.open(tmp_path, {**state, "version": 99})


def test_top_ranks_the_frame_aligned_with_the_query_first(tmp_path):
    a = FrameArchive(tmp_path, 10**6, L, H, D)
    g = torch.Generator().manual_seed(7)
    direction = torch.nn.functional.normalize(torch.randn(L, H, 1, D, generator=g), dim=-1)
    for i in range(6):
        k = 0.3 * torch.randn(L, H, N, D, generator=g)
        if i == 4:  # frame 4's keys all point along the query direction
            k = direction.expand(L, H, N, D) * 2.0
        a.add(i, float(i), k, torch.randn(L, H, N, D, generator=g), frame(i)[2])
    # queries: 2 query heads per KV head (GQA), each along its KV head's direction, plus an unrelated token
    q = torch.cat([direction.repeat_interleave(2, dim=1), torch.zeros(L, 2 * H, 1, D)], dim=2) * 3.0
    assert a.top(q, 1) == [4]
    ids, scores = a.score(q, groups=2)
    # hand oracle for frame 4: rep = 2 * direction (mean of equal keys), best query token 3 * direction
    expect = (3.0 * 2.0) / D ** 0.5
    assert abs(float(scores[ids.index(4)]) - expect) < 0.05 * expect


REAL_FAULT = """
import resource, signal, sys, torch
from infmllm_ros.memory import FrameArchive
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel then fails the write with EFBIG instead of killing us
a = FrameArchive(sys.argv[1], 10**6, 2, 2, 8)
k = torch.randn(2, 2, 4, 8)
pos = torch.arange(4).unsqueeze(1)
assert a.add(0, 0.0, k, k, pos)
resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))  # a page is > 100 bytes
ok = a.add(1, 1.0, k, k, pos)
print(ok, a.write_errors, a.get(0) is not None, sorted(__import__("os").listdir(sys.argv[1])))
"""


def test_real_write_fault_file_size_limit(tmp_path):
    """The OS refuses the write (RLIMIT_FSIZE -> EFBIG, a real OSError like ENOSPC): add False, no exception."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", REAL_FAULT, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False 1 True ['000000000000.kvp']"

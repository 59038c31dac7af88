"""SIGKILL during save(): a subprocess streams frames and saves several times after each one (so most of its time is
spent saving); it is killed at random moments, and twice exactly inside the file write (after the temporary file is
written, before the rename; half way through writing the payload: random kills rarely land in that ~1 ms window).
Each time, the file left at the path is a complete snapshot: it restores, and the restored session answers with the
logits of a session fed the same frames from scratch (the oracle)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import frame, make_session

from infmllm_ros.cache import CacheConfig
from infmllm_ros.engine import snapshot as snap

HERE = Path(__file__).resolve().parent
CFG = dict(policy="saddle", budget=64, recent=16, window=8, max_chunk=128, max_new_tokens=6)
SAVES_PER_FRAME = 4

SAVER = f"""
CFG = {CFG!r}
SAVES_PER_FRAME = {SAVES_PER_FRAME}
import os, signal, sys, torch
from engine_helpers import frame, get_tiny, make_session
from infmllm_ros.cache import CacheConfig
torch.set_num_threads(1)
path, where, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = [0]
if where == "fsync":  # die inside save number n: temporary file complete, not yet renamed
    real_fsync = os.fsync
    def fsync(fd):
        calls[0] += 1
        if calls[0] == 2 * nth - 1:  # each save fsyncs its file, then the directory
            os.kill(os.getpid(), signal.SIGKILL)
        real_fsync(fd)
    os.fsync = fsync
elif where == "write":  # die inside save number n half way through writing the payload (a torn file)
    real_fdopen = os.fdopen
    class Torn:
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)
        def write(self, b):
            if len(b) > 16384:  # the payload, not the header
                calls[0] += 1
                if calls[0] == nth:
                    self.f.write(b[: len(b) // 2])
                    self.f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            return self.f.write(b)
        def __getattr__(self, name):
            return getattr(self.f, name)
    os.fdopen = lambda *a, **k: Torn(real_fdopen(*a, **k))
model, proc = get_tiny("llava_llama")
s = make_session(model, proc, CacheConfig(**CFG))
i = 0
while True:
    s.observe(frame(100 + i), 0.5 * i)
    i += 1
    for _ in range(SAVES_PER_FRAME):  # most of the loop's time is spent saving: random kills land inside saves
        s.save(path)
        print("saved", i, flush=True)
"""


def _run_and_kill(path: Path, log: Path, where: str = "random", nth: int = 0, delay: float = 0.0) -> int:
    """Start the saver and kill it: `delay` s after its 3rd save ("random"), or it kills itself inside save number
    `nth` ("fsync": file written, not renamed; "write": half the payload written). Returns the last save it
    reported complete."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, "-c", SAVER, str(path), where, str(nth)], stdout=out,
                             stderr=subprocess.STDOUT, env=env)
        try:
            end = time.monotonic() + 120
            while p.poll() is None and "saved 3\n" not in log.read_text() and time.monotonic() < end:
                time.sleep(0.01)
            if where == "random":
                time.sleep(delay)
                p.send_signal(signal.SIGKILL)
            p.wait(60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    done = [int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("saved ")]
    return done[-1] if done else 0


def _check_snapshot(tiny, path: Path, reported: int) -> int:
    header, _ = snap.read(path)  # complete: checksum and length match
    k = header["frames_seen"]
    assert reported <= k <= reported + 1  # the last reported save, or one whose rename landed before the kill
    model, proc = tiny("llava_llama")
    restored = make_session(model, proc, CacheConfig(**CFG))
    restored.restore(path)
    ref = make_session(model, proc, CacheConfig(**CFG))
    for i in range(k):
        ref.observe(frame(100 + i), 0.5 * i)
    assert restored.stats()["tokens_stored"] == ref.stats()["tokens_stored"]
    a, b = (x.ask("Describe the image.", max_new_tokens=4, output_logits=True) for x in (restored, ref))
    assert a.tokens == b.tokens
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    return k


@pytest.mark.slow
def test_sigkill_during_save_leaves_a_loadable_correct_snapshot(tiny, tmp_path):
    path, log = tmp_path / "s.snap", tmp_path / "saver.log"
    for where, nth in (("fsync", 5), ("write", 10)):  # exactly inside save number nth
        frames = -(-(nth - 1) // SAVES_PER_FRAME)  # frames seen at the last completed save
        reported = _run_and_kill(path, log, where, nth)
        assert reported == frames
        leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".snaptmp")]
        assert len(leftovers) == 1  # the killed save's temporary file, never renamed over the snapshot
        assert _check_snapshot(tiny, path, reported) == frames
    rng = random.Random(0)
    for _ in range(4):  # random moments; each new run overwrites the previous run's snapshot
        reported = _run_and_kill(path, log, delay=rng.uniform(0.0, 0.4))
        _check_snapshot(tiny, path, reported)
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".snaptmp")]) <= 1  # later saves cleaned up

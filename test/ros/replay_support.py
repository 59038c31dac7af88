"""Helpers for the bag / record / replay tests: run the console scripts as users do, in their own processes.

Each test file passes its own ROS_DOMAIN_ID (`domain(offset)`: 60-69 belong to these tests) and discovery stays
on localhost.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
MODULES = {"infmllm-replay": "infmllm_ros.ros.replay", "infmllm-record": "infmllm_ros.ros.record",
           "infmllm-make-bag": "infmllm_ros.ros.make_bag", "infmllm_node": "infmllm_ros.ros.node"}


def domain(offset: int) -> int:
    """ROS_DOMAIN_ID of one bag test module: 60 + offset (0..9), the block given to these tests; set
    INFMLLM_BAG_DOMAIN_BASE to move the block when two test runs share a machine."""
    return int(os.environ.get("INFMLLM_BAG_DOMAIN_BASE", 60)) + offset


def env(domain: int) -> dict:
    e = dict(os.environ)
    e.update(ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONUNBUFFERED="1")
    return e


def command(name: str) -> list[str]:
    """The installed console script (as a user runs it), or `python -m` when the package is not installed."""
    script = BIN / name
    return [str(script)] if script.exists() else [sys.executable, "-m", MODULES[name]]


# Every live topic of these tests is remapped under a prefix unique to this pytest process, so two runs of the
# suite at once (a shared checkout, CI) never mix their messages even on the same ROS_DOMAIN_ID. Bags keep the
# plain names: the player publishes /image as NS/image and the recorder records NS/image as /image.
NS = f"/bagtest{os.getpid()}"
LIVE_TOPICS = ("/image", "/instruction", "/clock", "/camera/image/compressed", "/infmllm_node/result",
               "/infmllm_node/answer")


def isolation_args() -> list[str]:
    return ["--ros-args"] + [a for t in LIVE_TOPICS for a in ("-r", f"{t}:={NS}{t}")]


def cli(name: str, *args) -> list[str]:
    """Command line of a bag tool; replay and record get the isolation remaps (make-bag has no ROS args)."""
    extra = isolation_args() if name in ("infmllm-replay", "infmllm-record") else []
    return command(name) + [str(a) for a in args] + extra


def run(name: str, *args, domain: int, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cli(name, *args), env=env(domain), capture_output=True, text=True, timeout=timeout)


class Recorder:
    """infmllm-record in its own process; stderr goes to a file so nothing blocks on a full pipe."""

    def __init__(self, out: Path, topics: list[str], domain: int, *extra, preexec_fn=None):
        self.out = Path(out)
        self.log = self.out.with_name(self.out.name + ".record.log")
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(cli("infmllm-record", out, "--topics", *topics, *extra),
                                     env=env(domain), stdout=self._log_file, stderr=subprocess.STDOUT,
                                     preexec_fn=preexec_fn)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "recording" in self.text():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"recorder exited with {self.proc.returncode}: {self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"recorder not ready after {timeout} s: {self.text()}")

    def text(self) -> str:
        return self.log.read_text()

    def stop(self, sig=signal.SIGINT, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def wait(self, timeout: float = 30) -> int:
        rc = self.proc.wait(timeout)
        self._log_file.close()
        return rc


def sent_so_far(log: Path) -> int:
    """What the player's last progress line ('... 12/53 msgs') says it has sent (0 before the first line)."""
    counts = re.findall(r" (\d+)/\d+ msgs", log.read_text())
    return int(counts[-1]) if counts else 0


def start_replay(source, log: Path, domain: int) -> subprocess.Popen:
    """infmllm-replay of `source` once one subscriber is there, its progress lines written to `log` (for
    wait_until_sent / sent_so_far)."""
    with open(log, "w") as f:
        return subprocess.Popen(cli("infmllm-replay", source, "--wait-for-subscribers", "1", "--progress", "always"),
                                env=env(domain), stdout=subprocess.DEVNULL, stderr=f)


def wait_until_sent(log: Path, n: int, play: subprocess.Popen, timeout: float = 60) -> None:
    """Poll the player's progress line until it has sent n messages."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sent_so_far(log) >= n:
            return
        assert play.poll() is None, f"player exited early: {log.read_text()}"
        time.sleep(0.02)
    raise AssertionError(f"player did not send {n} messages in {timeout} s: {log.read_text()}")


def by_topic(messages) -> dict[str, list]:
    out: dict[str, list] = {}
    for topic, _msgtype, t, msg in messages:
        out.setdefault(topic, []).append((t, msg))
    return out


def assert_same_message(a, b, where: str = "") -> None:
    """Deserialized rosbags messages are equal field by field (numpy arrays compared by value)."""
    import numpy as np

    assert type(a).__name__ == type(b).__name__, where
    for field in a.__dataclass_fields__:
        if field == "__msgtype__":
            continue
        x, y = getattr(a, field), getattr(b, field)
        if hasattr(x, "__dataclass_fields__"):
            assert_same_message(x, y, f"{where}.{field}")
        elif isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and x.shape == y.shape and np.array_equal(x, y), f"{where}.{field}"
        else:
            assert x == y, f"{where}.{field}: {x!r} != {y!r}"


def stamp_ns(msg) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


def one_line_error(proc: subprocess.CompletedProcess, prog: str, ros_log_ok: bool = False) -> str:
    """Assert a clean failure: non-zero exit, no traceback, a single 'prog: error: ...' line; return it.
    ros_log_ok: also allow rcl's own '[ERROR] [...] [rcl]: ...' log lines (printed before rclpy raises)."""
    assert proc.returncode not in (0, None), proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()
             and not (ros_log_ok and line.startswith("[ERROR] [") and "[rcl]" in line)]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
    return lines[0]

SCRIPT = """\
- {t: 0.55, say: "What is in front of the robot?"}
- {t: 1.55, say: "How many people are walking?"}
- {t: 2.95, say: "Describe the scene."}
"""


def make_video_bag(out: Path, *extra, domain: int = 0, script: str = SCRIPT) -> Path:
    """A bag of real vtest.avi frames (fetched on first use) and three instructions, made by infmllm-make-bag."""
    from infmllm_ros.ros import media

    out = Path(out)
    script_file = out.with_name(out.name + ".say.yaml")
    script_file.write_text(script)
    proc = run("infmllm-make-bag", media.vtest_path(), out, "--script", script_file, *extra, domain=domain)
    assert proc.returncode == 0, proc.stderr
    return out

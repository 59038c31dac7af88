"""Test harness: the node in its own process (as users run it) and a client node in the test process.

Each test module uses its own ROS_DOMAIN_ID (plus ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST), so modules never
see each other's topics even when several run at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def domain(offset: int) -> int:
    """A ROS_DOMAIN_ID for one node test module: base + offset (0..4). The base comes from INFMLLM_ROS_DOMAIN_BASE
    or from the pytest process id (5, 10, ... 50), so two test runs on one machine (shared checkout, CI) rarely
    meet; it stays below 60 (60-64 are the bag tests', replay_support.domain) and inside 0..101, whose DDS ports
    never fall into Linux's ephemeral range."""
    base = int(os.environ.get("INFMLLM_ROS_DOMAIN_BASE", 5 + (os.getpid() % 10) * 5))
    return base + offset


def node_env(domain_id: int, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env["RCUTILS_LOGGING_BUFFERED_STREAM"] = "0"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(json.dumps(x) for x in v) + "]"
    return str(v)


class NodeProcess:
    """``python -m infmllm_ros.ros.node --ros-args [--params-file F] -p k:=v ...`` in a subprocess
    (``code``: ``python -c code --ros-args ...`` instead, for a node with an injected fault)."""

    def __init__(self, domain_id: int, params: dict | None = None, params_file: str | None = None,
                 env: dict | None = None, ros_args: list[str] | None = None, code: str | None = None):
        self.log_path = Path(tempfile.mkstemp(prefix="infmllm_node_", suffix=".log")[1])
        cmd = [sys.executable] + (["-c", code] if code else ["-m", "infmllm_ros.ros.node"]) + ["--ros-args"]
        if params_file:
            cmd += ["--params-file", str(params_file)]
        for k, v in (params or {}).items():
            cmd += ["-p", f"{k}:={_fmt(v)}"]
        cmd += list(ros_args or [])
        self.cmd = cmd
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(REPO), env=node_env(domain_id, env), stdout=self._log,
                                     stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


class Client:
    """A test-side rclpy node in its own context, spun in a background thread; collects messages."""

    def __init__(self, domain_id: int, name: str = "test_client"):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor

        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.lock = threading.Lock()
        self.msgs: dict[str, list] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self):
        while not self._stop and self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:
                if self._stop:
                    return
                raise

    def qos(self, reliable=True, depth=10, transient=False):
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                          reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL if transient else DurabilityPolicy.VOLATILE)

    def collect(self, msg_type, topic: str, qos=None, key: str | None = None):
        key = key or topic
        self.msgs.setdefault(key, [])

        def cb(m):
            with self.lock:
                self.msgs[key].append((time.monotonic(), m))

        return self.node.create_subscription(msg_type, topic, cb, qos or self.qos())

    def got(self, key: str) -> list:
        with self.lock:
            return [m for _, m in self.msgs.get(key, [])]

    def wait_for(self, pred, timeout: float = 20.0, interval: float = 0.05):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = pred()
            if r:
                return r
            time.sleep(interval)
        return pred()

    def call(self, srv_type, name: str, request, timeout: float = 20.0):
        cli = self.node.create_client(srv_type, name)
        try:
            if not cli.wait_for_service(timeout_sec=timeout):
                raise TimeoutError(f"service {name} not available")
            fut = cli.call_async(request)
            end = time.monotonic() + timeout
            while not fut.done() and time.monotonic() < end:
                time.sleep(0.02)
            if not fut.done():
                raise TimeoutError(f"service {name} did not answer in {timeout} s")
            return fut.result()
        finally:
            self.node.destroy_client(cli)

    def close(self):
        self._stop = True
        self._thread.join(5)
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()


def diag_values(arr) -> dict:
    """DiagnosticArray -> {key: value} of its first status (values parsed as JSON where possible)."""
    out = {}
    for st in arr.status:
        for kv in st.values:
            try:
                out[kv.key] = json.loads(kv.value)
            except ValueError:
                out[kv.key] = {"True": True, "False": False}.get(kv.value, kv.value)
        out["_level"] = int.from_bytes(st.level, "little") if isinstance(st.level, bytes) else int(st.level)
        out["_message"] = st.message
        break
    return out


def make_image(h: int, w: int, seed: int = 0, stamp=(0, 0), encoding: str = "rgb8"):
    from sensor_msgs.msg import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    m = Image()
    m.header.stamp.sec, m.header.stamp.nanosec = int(stamp[0]), int(stamp[1])
    m.header.frame_id = "camera"
    m.height, m.width, m.encoding, m.step = h, w, encoding, w * 3
    m.data = rgb.tobytes()
    return m

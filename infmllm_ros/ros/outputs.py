"""What the node publishes: ~/answer, ~/answer_stream, ~/result, ~/action, and /diagnostics; plus the counters
(``Stats``) that callbacks, the worker and diagnostics share."""

from __future__ import annotations

import collections
import json
import math
import os
import threading
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String


def qos(reliable: bool, depth: int, transient: bool = False) -> QoSProfile:
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth),
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if transient else DurabilityPolicy.VOLATILE)


class Stats:
    """Counters and latency windows, shared by callbacks, worker and diagnostics (one lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.c = collections.Counter()
        self.cb_ms = collections.deque(maxlen=2000)
        self.cb_max_ms = 0.0
        self.wait_ms = collections.deque(maxlen=2000)  # arrival in this process -> callback start
        self.wait_max_ms = 0.0
        self.answer_s = collections.deque(maxlen=200)
        self.last_error = ""
        self.rejects = collections.Counter()

    def inc(self, key: str, n: int = 1):
        with self.lock:
            self.c[key] += n

    def callback(self, ms: float, info=None, t_start_ns: int = 0):
        received = (info or {}).get("received_timestamp", 0) if isinstance(info, dict) else 0
        wait = (t_start_ns - received) / 1e6 if received and t_start_ns else None
        with self.lock:
            self.cb_ms.append(ms)
            self.cb_max_ms = max(self.cb_max_ms, ms)
            if wait is not None and wait >= 0:
                self.wait_ms.append(wait)
                self.wait_max_ms = max(self.wait_max_ms, wait)


def _pct(values, q: float) -> float:
    return float(np.percentile(np.fromiter(values, float), q)) if values else 0.0


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def archive_fault(stats: dict) -> str:
    """'' when the on-disk frame archive is healthy (or off), else what /diagnostics warns about."""
    if not stats:
        return ""
    parts = []
    if stats.get("stopped"):
        parts.append(f"stopped ({stats['stopped']})")
    for key, what in (("write_errors", "write error(s)"), ("damaged", "damaged page(s) skipped"),
                      ("stats_error", "stats failed:")):
        if stats.get(key):
            parts.append(f"{stats[key]} {what}" if key != "stats_error" else f"{what} {stats[key]}")
    return ("frame archive: " + ", ".join(parts) + "; answering continues") if parts else ""


class Outputs:
    """The lifecycle publishers of answers and actions (created at configure) and /diagnostics (always)."""

    def __init__(self, node):
        self.node = node
        self.pubs: dict = {}
        self.stamps: collections.OrderedDict = collections.OrderedDict()  # frame stamp_s -> (sec, nanosec)

    def create(self, p: dict):
        n = self.node
        out_qos = qos(True, p["output_depth"], p["output_durability"] == "transient_local")
        self.pubs = {
            "answer": n.create_lifecycle_publisher(String, "~/answer", out_qos),
            "answer_stream": n.create_lifecycle_publisher(String, "~/answer_stream", qos(True, 100)),
            "result": n.create_lifecycle_publisher(String, "~/result", out_qos),
            "action": n.create_lifecycle_publisher(String, "~/action", qos(True, 10)),
        }

    def destroy(self):
        for pub in self.pubs.values():
            self.node.destroy_lifecycle_publisher(pub)
        self.pubs = {}

    def publish(self, name: str, msg):
        pub = self.pubs.get(name)
        if pub is not None:
            try:
                pub.publish(msg)
            except Exception as e:  # publisher destroyed by a concurrent cleanup
                self.node.get_logger().debug(f"publish {name}: {e}")

    def now_stamp(self) -> dict:
        t = self.node.get_clock().now().to_msg()
        return {"sec": t.sec, "nanosec": t.nanosec}

    def remember_frame(self, stamp_s: float, stamp: tuple):
        self.stamps[stamp_s] = stamp
        while len(self.stamps) > 256:
            self.stamps.popitem(last=False)

    def answer(self, text: str, answer_text: str, ans, action, err, latency: float, extra: dict | None = None):
        """~/answer and the ~/result record of one instruction."""
        frame_stamp = getattr(ans, "frame_stamp", None) if ans is not None else None
        cache = dict(getattr(ans, "cache", None) or {}) if ans is not None else {}
        stamp = self.stamps.get(frame_stamp) if frame_stamp is not None else None
        if stamp is None and frame_stamp is not None:
            sec = math.floor(frame_stamp)
            stamp = (int(sec), int(round((frame_stamp - sec) * 1e9)))
        result = {
            "instruction": text,
            "answer": answer_text,
            "action": action.to_dict() if action is not None else None,
            "action_error": err,
            "frame_stamp": {"sec": stamp[0], "nanosec": stamp[1]} if stamp is not None else None,
            "latency_s": round(latency, 6),
            "session_latency_s": getattr(ans, "latency_s", None) if ans is not None else None,
            "tokens": len(getattr(ans, "tokens", []) or []) if ans is not None else 0,
            "cache": cache,
            "evidence": mt.on_answer(ans) if (mt := self.node.memory_topics) is not None and ans is not None else None,
            "stamp": self.now_stamp(),
        }
        result.update(extra or {})
        self.publish("answer", String(data=answer_text))
        self.publish("result", String(data=json.dumps(result, default=json_default)))

    # ------------------------------------------------------------------------------------------------ diagnostics
    def diagnostics_values(self) -> dict:
        n = self.node
        stats, worker, motion = n.stats, n.worker, n.motion
        with stats.lock:
            c = dict(stats.c)
            cb = list(stats.cb_ms)
            cb_max = stats.cb_max_ms
            wait = list(stats.wait_ms)
            wait_max = stats.wait_max_ms
            lat = list(stats.answer_s)
            last_error = stats.last_error
        raw = worker.session_stats if worker.session is not None else {}
        inner = raw.get("cache") if isinstance(raw.get("cache"), dict) else {}

        def pick(*keys, default=0):
            for src in (inner, raw):
                for k in keys:
                    if k in src and src[k] is not None:
                        return src[k]
            return default

        busy = worker.busy_since
        validator = worker.validator
        v = {
            "state": n.state_label,
            "tokens_stored": pick("stored", "tokens_stored"),
            "tokens_budget": pick("budget", "tokens_budget", default=n.p.get("cache.budget", 0)),
            "tokens_seen": pick("seen", "tokens_seen"),
            "kv_bytes": pick("kv_bytes"),
            "tokens_per_frame": pick("tokens_per_frame"),
            "evictions": pick("evictions"),
            "frames_in": c.get("frames_in", 0),
            "frames_used": c.get("frames_used", 0),
            "frames_dropped": c.get("frames_dropped", 0),
            "frames_rejected": c.get("frames_rejected", 0),
            "frames_skipped": c.get("frames_skipped", 0),
            "instructions_in": c.get("instructions_in", 0),
            "instructions_rejected": c.get("instructions_rejected", 0),
            "instructions_dropped": c.get("instructions_dropped", 0),
            "rejected_inputs": c.get("frames_rejected", 0) + c.get("instructions_rejected", 0),
            "answers": c.get("answers", 0),
            "answers_cancelled": c.get("answers_cancelled", 0),
            "answer_latency_p50_s": round(_pct(lat, 50), 4),
            "answer_latency_p95_s": round(_pct(lat, 95), 4),
            "callback_ms_p50": round(_pct(cb, 50), 4),
            "callback_ms_p95": round(_pct(cb, 95), 4),
            "callback_ms_max": round(cb_max, 4),
            "callbacks": len(cb),
            "callback_wait_ms_p50": round(_pct(wait, 50), 4),
            "callback_wait_ms_p95": round(_pct(wait, 95), 4),
            "callback_wait_ms_max": round(wait_max, 4),
            "worker_busy_s": round(time.monotonic() - busy, 3) if busy else 0.0,
            "actions_accepted": validator.accepted if validator else 0,
            "actions_rejected": validator.rejected if validator else 0,
            "actions_clamped": validator.clamped if validator else 0,
            "armed": bool(motion.gate and motion.gate.armed),
            "cmd_vel_motion": c.get("cmd_vel_motion", 0),
            "cmd_vel_zero": c.get("cmd_vel_zero", 0),
            "errors": c.get("errors", 0),
            "resets": c.get("resets", 0),
            "memory_images": c.get("memory_images", 0),
            "session_lost": worker.session_lost,
            "frame_age_s": None if worker.frame_age() is None else round(worker.frame_age(), 3),
            "view_stale": n.state_label == "active" and worker.stale(),
            "rss_bytes": _rss_bytes(),
            "last_error": last_error,
            "snapshot_status": worker.snapshots.status,
            "snapshots_saved": c.get("snapshots_saved", 0),
            "snapshot_errors": c.get("snapshot_errors", 0),
            "last_save": worker.snapshots.last_save,
        }
        arch = worker.archive_stats if worker.session is not None else {}
        for k, val in arch.items():
            if val is None or isinstance(val, (int, float, str)):
                v["archive_" + k] = val
        v["archive_fault"] = archive_fault(arch)
        for prefix, src in (("cache_", inner), ("session_", raw)):
            for k, val in src.items():
                if isinstance(val, (int, float, str)) and not isinstance(val, bool) and k not in (
                        "stored", "budget", "seen", "kv_bytes", "evictions", "tokens_stored", "tokens_seen"):
                    v.setdefault(prefix + k, val)
        return v

    def publish_diagnostics(self, pub):
        n = self.node
        v = self.diagnostics_values()
        st = DiagnosticStatus()
        st.name = f"{n.get_name()}: session"
        st.hardware_id = n.hardware_id
        if v["session_lost"]:
            st.level, st.message = DiagnosticStatus.ERROR, "session lost"
        elif v["state"] == "unconfigured" and v["last_error"].startswith("configure"):
            st.level, st.message = DiagnosticStatus.ERROR, v["last_error"][:200]
        elif v["view_stale"]:
            age = v["frame_age_s"]
            st.level, st.message = DiagnosticStatus.WARN, "view stale: " + (
                "no frame yet" if age is None else f"newest frame {age:.1f} s old")
        elif v["archive_fault"]:  # answering goes on from the GPU cache; the long-term memory is degraded
            st.level, st.message = DiagnosticStatus.WARN, v["archive_fault"][:200]
        elif v["errors"] or v["last_error"]:
            st.level, st.message = DiagnosticStatus.WARN, v["last_error"][:200] or "errors in the session"
        else:
            st.level, st.message = DiagnosticStatus.OK, v["state"]
        st.values = [KeyValue(key=k, value=str(val)) for k, val in v.items()]
        arr = DiagnosticArray()
        arr.header.stamp = n.get_clock().now().to_msg()
        arr.status = [st]
        pub.publish(arr)

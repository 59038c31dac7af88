"""``infmllm_node``: the lifecycle node around one continuous StreamingSession.

Thin glue (as mgonzs13/yolo_ros): parameters, QoS, conversion, a one-slot frame mailbox, a bounded instruction
queue, ONE worker thread that owns the session, publishers, services, a motion watchdog and /diagnostics.

Lifecycle
  configure  read parameters, load the actions file, build the session (model + cache), start the worker,
             create publishers, services, the diagnostics and watchdog timers
  activate   create the ``image`` and ``instruction`` subscriptions (outputs start publishing)
  deactivate destroy the subscriptions, drop what is queued, zero the velocity, disarm
  cleanup    stop the worker, free the session (and CUDA memory), destroy everything configure created
``main()`` configures and activates unless the ``autostart`` parameter is false.

Threads: subscription callbacks only deserialize, validate, convert (zero-copy views) and hand over, counting
what they do and how long it takes (``callback_ms_*`` in /diagnostics). The worker observes at most
``frame_rate`` frames per second (the newest one: latest frame wins; a frame replaced before the worker took
it is counted as dropped) and answers instructions in arrival order. Before answering, it observes the newest
pending frame even above ``frame_rate``, so answers see the freshest view.

Actions (``actions.mode``)
  ``prefix`` (default)  an instruction starting with ``actions.prefix`` (``"action:"``, case-insensitive) is a
                        command: the model is asked ``actions.prompt`` with decoding constrained to the JSON
                        schema of ``actions.file``; its output is validated and clamped, then published on
                        ``~/action`` and, for move/stop while armed, on ``cmd_vel``.
  ``always``            every instruction gets its answer, then one constrained action decoding.
  ``off``               never.
Fails closed: no constraint available, invalid JSON, unknown action, non-finite number -> no action, a log line,
``actions_rejected`` + 1. The watchdog publishes zero velocity when a motion's duration ends, on deactivate,
on an error in the session, and when the worker thread dies (the session is lost).

Time: frame stamps come from message headers (``use_sim_time`` works for bag replay); latencies, rates,
motion durations and the 1 Hz diagnostics timer use the wall/steady clock.
"""

from __future__ import annotations

import collections
import json
import math
import os
import struct
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Twist
from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import SetBool, Trigger

from infmllm_ros.actions import Action, ActionConstraint, ActionSpec, ActionValidator, MotionGate
from infmllm_ros.ros import session_factory as sf
from infmllm_ros.ros.convert import ImageConversionError, compressed_to_rgb, imgmsg_to_rgb
from infmllm_ros.ros.memory_topics import MemoryTopics

NODE_NAME = "infmllm_node"

# name -> default. Every one is in config/robot.yaml with a comment. Types follow the defaults.
PARAMS: dict[str, object] = {
    "autostart": True,
    "model": "",
    "device": "cpu",
    "dtype": "float32",
    "system_prompt": "",
    "session_factory": "",
    "cache.policy": "saddle",
    "cache.budget": 512,
    "cache.recent": 64,
    "cache.window": 32,
    "cache.sinks": 0,
    "cache.bias": "linear",
    "cache.bias_strength": 1.0,
    "cache.positions": "reindex",
    "cache.max_chunk": 256,
    "frame_rate": 1.0,
    "max_image_pixels": 16 * 1024 * 1024,
    "generation.max_new_tokens": 64,
    "generation.temperature": 0.0,
    "generation.top_p": 1.0,
    "generation.stop": [""],  # "" entries are ignored (an empty list has no ROS type)
    "image_topic": "image",
    "image_transport": "raw",
    "image_reliability": "best_effort",
    "image_depth": 1,
    "instruction_topic": "instruction",
    "instruction_depth": 10,
    "instruction_durability": "volatile",
    "max_instruction_chars": 4000,
    "output_durability": "volatile",
    "output_depth": 10,
    "cmd_vel_topic": "cmd_vel",
    "answer_stream": True,
    "actions.file": "",
    "actions.mode": "prefix",
    "actions.prefix": "action:",
    "actions.prompt": "{instruction}",
    "actions.max_new_tokens": 64,
    "watchdog_rate": 10.0,
    "diagnostics_period": 1.0,
    "reset_timeout": 5.0,
    "memory.rate": 1.0,
}

_STRING_ARRAY = ParameterDescriptor(type=ParameterType.PARAMETER_STRING_ARRAY)


def default_actions_file() -> str:
    """The installed share/infmllm_ros/config/actions.yaml, else the source tree's config/actions.yaml."""
    try:
        from ament_index_python.packages import get_package_share_directory

        p = Path(get_package_share_directory("infmllm_ros")) / "config" / "actions.yaml"
        if p.exists():
            return str(p)
    except Exception:  # not installed through colcon / no AMENT_PREFIX_PATH
        pass
    for base in (Path(sys.prefix) / "share" / "infmllm_ros", Path(__file__).resolve().parents[2]):
        p = base / "config" / "actions.yaml"
        if p.exists():
            return str(p)
    return ""


def decode_string_cdr(raw: bytes, max_chars: int) -> str:
    """std_msgs/String from serialized CDR, strictly: invalid UTF-8 or a malformed buffer raise ValueError.

    (rclpy's own deserialization silently replaces invalid UTF-8 and drops malformed buffers without a trace.)
    """
    if len(raw) < 8:
        raise ValueError(f"malformed String message: {len(raw)} bytes")
    if raw[0] != 0 or raw[1] not in (0, 1):
        raise ValueError(f"malformed String message: unknown CDR encapsulation {bytes(raw[:2])!r}")
    (n,) = struct.unpack("<I" if raw[1] == 1 else ">I", raw[4:8])
    if n == 0 or 8 + n > len(raw):
        raise ValueError(f"malformed String message: length field {n} with {len(raw) - 8} bytes of payload")
    if n - 1 > 4 * max_chars:  # cheap size check before decoding
        raise ValueError(f"instruction too long: {n - 1} bytes > {4 * max_chars}")
    body = bytes(raw[8:8 + n - 1])
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"instruction is not valid UTF-8 ({e.reason} at byte {e.start})") from None


class _Cancelled(Exception):
    """Raised from on_token to abandon a generation (reset requested or node deactivating)."""


class _Stats:
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


class InfMLLMNode(LifecycleNode):
    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        for name, default in PARAMS.items():
            self.declare_parameter(name, default, _STRING_ARRAY if isinstance(default, list) else None)
        self.stats = _Stats()
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._srv_group = MutuallyExclusiveCallbackGroup()
        self._cv = threading.Condition()
        self._frame = None  # (rgb view, stamp_s, header stamp, t_received)
        self._instructions: collections.deque = collections.deque()
        self._reset_events: list[threading.Event] = []
        self._stop = False
        self._cancel = threading.Event()
        self._worker: threading.Thread | None = None
        self._session = None
        self._session_lost = False
        self._busy_since = 0.0
        self._subs = []
        self._pubs = {}
        self._svc_list = []
        self._timer_list = []
        self._p: dict = {}
        self._log_budget = [0.0, 0]  # rate limit for reject log lines: (window start, lines in window)
        self.spec: ActionSpec | None = None
        self.validator: ActionValidator | None = None
        self.gate: MotionGate | None = None
        self.constraint: ActionConstraint | None = None
        self._constraint_error = ""
        self._stamps: collections.OrderedDict = collections.OrderedDict()  # stamp_s -> (sec, nanosec)
        self._memory: MemoryTopics | None = None  # ~/memory, ~/memory_image (ros/memory_topics.py)
        self._session_stats: dict = {}  # snapshot taken by the worker (the only thread that touches the session)
        self._state_label = "unconfigured"
        # /diagnostics runs in every lifecycle state (steady clock: also without /clock under use_sim_time), so a
        # failed configure is visible there too
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        period = float(self.get_parameter("diagnostics_period").value)
        self._diag_timer = self.create_timer(period if period > 0 else 1.0, self._publish_diagnostics,
                                             clock=self._steady)

    # ------------------------------------------------------------------------------------------------ parameters
    def _read_params(self) -> dict:
        p = {name: self.get_parameter(name).value for name in PARAMS}
        p["generation.stop"] = [s for s in (p["generation.stop"] or []) if s]
        for key, allowed in (("image_transport", ("raw", "compressed")),
                             ("image_reliability", ("best_effort", "reliable")),
                             ("instruction_durability", ("volatile", "transient_local")),
                             ("output_durability", ("volatile", "transient_local")),
                             ("actions.mode", ("prefix", "always", "off"))):
            if p[key] not in allowed:
                raise ValueError(f"parameter {key} must be one of {allowed}, got {p[key]!r}")
        if not p["frame_rate"] > 0:
            raise ValueError(f"frame_rate must be > 0 (frames per second entering the session), got {p['frame_rate']}")
        for key in ("image_depth", "instruction_depth", "output_depth", "max_instruction_chars",
                    "generation.max_new_tokens", "actions.max_new_tokens"):
            if int(p[key]) < 1:
                raise ValueError(f"parameter {key} must be >= 1, got {p[key]}")
        for key in ("watchdog_rate", "diagnostics_period", "reset_timeout", "memory.rate"):
            if not p[key] > 0:
                raise ValueError(f"parameter {key} must be > 0, got {p[key]}")
        try:
            p["actions.prompt"].format(instruction="x", schema="y")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"actions.prompt may only use {{instruction}} and {{schema}}: {e!r}") from None
        return p

    def _qos(self, reliable: bool, depth: int, transient: bool = False) -> QoSProfile:
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth),
                          reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL if transient else DurabilityPolicy.VOLATILE)

    # ------------------------------------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            p = self._p = self._read_params()
            afile = p["actions.file"] or default_actions_file()
            self.spec = ActionSpec.from_yaml(afile) if afile else ActionSpec()
            self.validator = ActionValidator(self.spec)
            self.gate = MotionGate(self.spec)
            t0 = time.monotonic()
            self._session = sf.load_factory(p["session_factory"])(dict(p))
            self.get_logger().info(f"session ready in {time.monotonic() - t0:.1f} s (model {p['model']!r}, "
                                   f"device {p['device']}, actions file {afile or '(built-in defaults)'})")
            self._build_constraint()
        except Exception as e:
            self.get_logger().error(f"configure failed: {e}")
            self.stats.last_error = f"configure: {e}"
            self._release_session()
            return TransitionCallbackReturn.FAILURE
        out_qos = self._qos(True, p["output_depth"], p["output_durability"] == "transient_local")
        self._pubs = {
            "answer": self.create_lifecycle_publisher(String, "~/answer", out_qos),
            "answer_stream": self.create_lifecycle_publisher(String, "~/answer_stream", self._qos(True, 100)),
            "result": self.create_lifecycle_publisher(String, "~/result", out_qos),
            "action": self.create_lifecycle_publisher(String, "~/action", self._qos(True, 10)),
            "cmd_vel": self.create_lifecycle_publisher(Twist, p["cmd_vel_topic"], self._qos(True, 10)),
        }
        self._memory = MemoryTopics(self, p["memory.rate"])
        self._pubs.update(self._memory.publishers)
        self._svc_list = [
            self.create_service(Trigger, "~/reset", self._on_reset, callback_group=self._srv_group),
            self.create_service(SetBool, "~/enable_actions", self._on_enable_actions, callback_group=self._srv_group),
        ]
        self._timer_list = [self.create_timer(1.0 / float(p["watchdog_rate"]), self._watchdog, clock=self._steady)]
        self._stop = False
        self._session_lost = False
        self._worker = threading.Thread(target=self._worker_main, name="infmllm_session", daemon=True)
        self._worker.start()
        self._state_label = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        p = self._p
        msg_type = CompressedImage if p["image_transport"] == "compressed" else Image
        image_qos = self._qos(p["image_reliability"] == "reliable", p["image_depth"])
        instr_qos = self._qos(True, p["instruction_depth"], p["instruction_durability"] == "transient_local")
        self._subs = [
            self.create_subscription(msg_type, p["image_topic"], self._on_image, image_qos, raw=True),
            self.create_subscription(String, p["instruction_topic"], self._on_instruction, instr_qos, raw=True),
        ]
        self._state_label = "active"
        image_topic, instr_topic = (self.resolve_topic_name(p[k]) for k in ("image_topic", "instruction_topic"))
        self.get_logger().info(f"active: image {image_topic} ({msg_type.__name__}, {p['image_reliability']}), "
                               f"instruction {instr_topic}")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._destroy_subs()
        with self._cv:
            if self._frame is not None:
                self.stats.inc("frames_dropped")
            self._frame = None
            self.stats.inc("instructions_dropped", len(self._instructions))
            self._instructions.clear()
        self._zero_velocity("deactivate")
        if self.gate is not None:
            self.gate.set_armed(False, time.monotonic())
        self._state_label = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self._state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._destroy_subs()
        self._zero_velocity("shutdown")
        self._teardown()
        self._state_label = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"lifecycle error from state {state.label}: stopping motion, releasing the session")
        self._destroy_subs()
        self._zero_velocity("error")
        self._teardown()
        self._state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def _destroy_subs(self):
        for s in self._subs:
            self.destroy_subscription(s)
        self._subs = []

    def _teardown(self):
        self._stop_worker()
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        self._release_session()
        for t in self._timer_list:
            self.destroy_timer(t)
        self._timer_list = []
        for s in self._svc_list:
            self.destroy_service(s)
        self._svc_list = []
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        self._pubs = {}

    def _stop_worker(self):
        with self._cv:
            self._stop = True
            self._cancel.set()
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
            if self._worker.is_alive():
                self.get_logger().error("worker thread did not stop within 30 s (a generation is stuck)")
        self._worker = None
        self._cancel.clear()

    def _release_session(self):
        s, self._session = self._session, None
        self.constraint = None
        if s is None:
            return
        close = getattr(s, "close", None)
        if callable(close):
            try:
                close()
            except Exception as e:
                self.get_logger().warning(f"session close: {e}")
        del s
        import gc

        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _build_constraint(self):
        self.constraint, self._constraint_error = None, ""
        if self._p["actions.mode"] == "off":
            return
        tok = sf.tokenizer_of(self._session)
        if tok is None:
            self._constraint_error = "the session exposes no tokenizer"
        else:
            try:
                t0 = time.monotonic()
                self.constraint = ActionConstraint(self.spec, tok)
                self.get_logger().info(f"action constraint ready in {time.monotonic() - t0:.2f} s")
            except Exception as e:
                self._constraint_error = f"{type(e).__name__}: {e}"
        if self.constraint is None:
            self.get_logger().warning(f"constrained action decoding unavailable ({self._constraint_error}): "
                                      "every action request will be refused (fail closed)")

    # ------------------------------------------------------------------------------------------------ inputs
    def _reject(self, kind: str, reason: str):
        with self.stats.lock:
            self.stats.c[f"{kind}_rejected"] += 1
            self.stats.rejects[reason.split(":")[0][:60]] += 1
            self.stats.last_error = f"{kind}: {reason}"
        now = time.monotonic()
        if now - self._log_budget[0] > 1.0:
            self._log_budget[:] = [now, 0]
        self._log_budget[1] += 1
        if self._log_budget[1] <= 20:
            self.get_logger().warning(f"rejected {kind}: {reason}")
        elif self._log_budget[1] == 21:
            self.get_logger().warning("more rejected inputs this second; counting them in /diagnostics only")

    def _on_image(self, raw: bytes, info):
        t_ns, t0 = time.time_ns(), time.perf_counter()
        try:
            compressed = self._p["image_transport"] == "compressed"
            try:
                msg = deserialize_message(raw, CompressedImage if compressed else Image)
            except Exception as e:
                self._reject("frames", f"malformed message: {e}")
                return
            try:
                rgb = (compressed_to_rgb(msg, self._p["max_image_pixels"]) if compressed
                       else imgmsg_to_rgb(msg, self._p["max_image_pixels"]))
            except ImageConversionError as e:
                self._reject("frames", str(e))
                return
            st = msg.header.stamp
            item = (rgb, st.sec + st.nanosec * 1e-9, (st.sec, st.nanosec), time.monotonic())
            with self._cv:
                if self._frame is not None:
                    self.stats.inc("frames_dropped")
                self._frame = item
                self._cv.notify()
            self.stats.inc("frames_in")
        finally:
            self.stats.callback((time.perf_counter() - t0) * 1e3, info, t_ns)

    def _on_instruction(self, raw: bytes, info):
        t_ns, t0 = time.time_ns(), time.perf_counter()
        try:
            limit = int(self._p["max_instruction_chars"])
            try:
                text = decode_string_cdr(raw, limit)
            except ValueError as e:
                self._reject("instructions", str(e))
                return
            if "\x00" in text:
                self._reject("instructions", "instruction contains a NUL character")
                return
            text = text.strip()
            if not text:
                self._reject("instructions", "empty instruction")
                return
            if len(text) > limit:
                self._reject("instructions", f"instruction too long: {len(text)} > max_instruction_chars={limit}")
                return
            with self._cv:
                if len(self._instructions) >= int(self._p["instruction_depth"]):
                    self._instructions.popleft()
                    self.stats.inc("instructions_dropped")
                    self.get_logger().warning("instruction queue full: dropped the oldest instruction")
                self._instructions.append((text, time.monotonic()))
                self._cv.notify()
            self.stats.inc("instructions_in")
        finally:
            self.stats.callback((time.perf_counter() - t0) * 1e3, info, t_ns)

    # ------------------------------------------------------------------------------------------------ worker
    def _snapshot_stats(self):
        try:
            self._session_stats = dict(self._session.stats() or {})
        except Exception as e:  # stats() must not take the worker down
            self._session_stats = {"stats_error": str(e)}
        try:
            if self._memory is not None:
                self._memory.update(self._session)
        except Exception as e:  # memory view must not take the worker down
            self.stats.last_error = f"memory: {type(e).__name__}: {e}"

    def _worker_main(self):
        period = 1.0 / float(self._p["frame_rate"])
        next_frame_t = 0.0
        self._snapshot_stats()
        try:
            while True:
                with self._cv:
                    while True:
                        if self._stop:
                            return
                        now = time.monotonic()
                        if self._reset_events or self._instructions:
                            break
                        if self._frame is not None and now >= next_frame_t:
                            break
                        timeout = None if self._frame is None else max(next_frame_t - now, 0.001)
                        self._cv.wait(timeout)
                    resets, self._reset_events = self._reset_events, []
                    instr = self._instructions.popleft() if (self._instructions and not resets) else None
                    frame = None
                    if self._frame is not None and (instr is not None or time.monotonic() >= next_frame_t):
                        frame, self._frame = self._frame, None
                if resets:
                    self._do_reset(resets)
                    continue
                if frame is not None:
                    next_frame_t = time.monotonic() + period
                    self._observe(frame)
                if instr is not None:
                    self._answer(*instr)
                self._snapshot_stats()
        except BaseException as e:  # the session is lost: the watchdog sees a dead worker and zeroes the velocity
            self._session_lost = True
            self.stats.last_error = f"worker died: {type(e).__name__}: {e}"
            self.get_logger().fatal(f"worker thread died, session lost: {traceback.format_exc()}")

    def _session_error(self, where: str, e: Exception):
        self.stats.inc("errors")
        self.stats.last_error = f"{where}: {type(e).__name__}: {e}"
        self.get_logger().error(f"{where} failed: {type(e).__name__}: {e}")
        self._zero_velocity(f"error in {where}")

    def _observe(self, frame):
        rgb, stamp_s, stamp, _ = frame
        self._busy_since = time.monotonic()
        try:
            self._session.observe(np.ascontiguousarray(rgb), stamp_s)
        except ValueError as e:  # InvalidFrameError: the session is unchanged
            self._reject("frames", f"session refused the frame: {e}")
            return
        except Exception as e:
            self._session_error("observe", e)
            return
        finally:
            self._busy_since = 0.0
        self.stats.inc("frames_used")
        if self._memory is not None:
            self._memory.on_frame(rgb, stamp_s, stamp)
        self._stamps[stamp_s] = stamp
        while len(self._stamps) > 256:
            self._stamps.popitem(last=False)

    def _on_token(self, piece: str):
        if self._cancel.is_set():
            raise _Cancelled()
        if self._p["answer_stream"] and piece:
            self._publish("answer_stream", String(data=piece))

    def _ask(self, text: str, max_new_tokens: int, allowed_tokens_fn=None):
        g = self._p
        return self._session.ask(text, max_new_tokens=int(max_new_tokens), on_token=self._on_token,
                                 temperature=float(g["generation.temperature"]), top_p=float(g["generation.top_p"]),
                                 stop=list(g["generation.stop"]) or None, allowed_tokens_fn=allowed_tokens_fn)

    def _is_command(self, text: str) -> tuple[bool, str]:
        mode, prefix = self._p["actions.mode"], self._p["actions.prefix"]
        if mode == "prefix" and prefix and text.lower().startswith(prefix.lower()):
            return True, text[len(prefix):].strip()
        return False, text

    def _decide_action(self, instruction: str) -> tuple[Action | None, str | None, object]:
        """Constrained decoding of one action, then validation. Returns (action, error, Answer or None)."""
        if self.constraint is None:
            err = f"constrained action decoding unavailable ({self._constraint_error}); no action"
            self.validator.refuse(err)
            return None, err, None
        prompt = self._p["actions.prompt"].format(instruction=instruction, schema=self.spec.describe())
        ans = self._ask(prompt, self._p["actions.max_new_tokens"], self.constraint.allowed_tokens_fn())
        action, err = self.validator.validate(ans.text)
        return action, err, ans

    def _answer(self, text: str, t_received: float):
        self._busy_since = time.monotonic()
        self._cancel.clear()
        command, body = self._is_command(text)
        action = err = ans = None
        try:
            if command:
                action, err, ans = self._decide_action(body)
                answer_text = ans.text if ans is not None else ""
            else:
                ans = self._ask(text, self._p["generation.max_new_tokens"])
                answer_text = ans.text
                if self._p["actions.mode"] == "always":
                    action, err, _ = self._decide_action(text)
        except _Cancelled:
            self.stats.inc("answers_cancelled")
            self.get_logger().info(f"generation for {text[:60]!r} cancelled")
            return
        except ValueError as e:  # InvalidInstructionError: the session is unchanged
            self._reject("instructions", f"session refused the instruction: {e}")
            return
        except Exception as e:
            self._session_error("ask", e)
            return
        finally:
            self._busy_since = 0.0
        latency = time.monotonic() - t_received
        if err is not None:
            self.stats.last_error = f"action: {err}"
            self.get_logger().error(f"action rejected (no motion): {err}")
        if action is not None:
            self._publish("action", String(data=action.to_json()))
            tw = self.gate.command(action, time.monotonic())
            if tw is not None:
                self._publish_twist(tw)
            elif action.moves_base:
                self.get_logger().info(f"action {action.kind} not executed: actions are disarmed")
        frame_stamp = getattr(ans, "frame_stamp", None) if ans is not None else None
        cache = dict(getattr(ans, "cache", None) or {}) if ans is not None else {}
        stamp = self._stamps.get(frame_stamp) if frame_stamp is not None else None
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
            "evidence": self._memory.on_answer(ans) if self._memory is not None and ans is not None else None,
            "stamp": self._now_stamp(),
        }
        self._publish("answer", String(data=answer_text))
        self._publish("result", String(data=json.dumps(result, default=_json_default)))
        with self.stats.lock:
            self.stats.c["answers"] += 1
            self.stats.answer_s.append(latency)

    def _do_reset(self, events):
        try:
            self._session.reset()
            self._stamps.clear()
            self.stats.inc("resets")
            ok = True
        except Exception as e:
            self._session_error("reset", e)
            ok = False
        self._snapshot_stats()  # before answering the service: diagnostics then show the empty session
        for ev in events:
            ev.ok = ok
            ev.set()

    # ------------------------------------------------------------------------------------------------ outputs
    def _now_stamp(self) -> dict:
        t = self.get_clock().now().to_msg()
        return {"sec": t.sec, "nanosec": t.nanosec}

    def _publish(self, name: str, msg):
        pub = self._pubs.get(name)
        if pub is not None:
            try:
                pub.publish(msg)
            except Exception as e:  # publisher destroyed by a concurrent cleanup
                self.get_logger().debug(f"publish {name}: {e}")

    def _publish_twist(self, tw):
        m = Twist()
        m.linear.x, m.angular.z = float(tw[0]), float(tw[1])
        self._publish("cmd_vel", m)
        self.stats.inc("cmd_vel_zero" if tw == (0.0, 0.0) else "cmd_vel_motion")

    def _zero_velocity(self, why: str):
        if self.gate is None:
            return
        tw = self.gate.stop(why)
        if tw is not None:
            self.get_logger().info(f"zero velocity: {why}")
            self._publish_twist(tw)

    def _watchdog(self):
        if self.gate is None:
            return
        if self._worker is not None and not self._worker.is_alive() and not self._stop:
            if not self._session_lost or self.gate.armed or self.gate.active:
                self._session_lost = True
                self._zero_velocity("session lost")
                self.gate.set_armed(False, time.monotonic())  # stays disarmed until cleanup + configure
            return
        tw = self.gate.tick(time.monotonic())
        if tw is not None:
            self._publish_twist(tw)

    # ------------------------------------------------------------------------------------------------ services
    def _on_reset(self, request, response):
        if self._session is None or self._worker is None:
            response.success, response.message = False, "not configured"
            return response
        ev = threading.Event()
        ev.ok = False
        with self._cv:
            self._reset_events.append(ev)
            self._cancel.set()  # abandon a running generation: the context it belongs to is being dropped
            self._cv.notify_all()
        if ev.wait(float(self._p["reset_timeout"])):
            response.success = bool(ev.ok)
            response.message = "session reset" if ev.ok else f"reset failed: {self.stats.last_error}"
        else:
            response.success, response.message = False, "reset pending: the worker is busy; it will run next"
        return response

    def _on_enable_actions(self, request, response):
        if self.gate is None:
            response.success, response.message = False, "not configured"
            return response
        if request.data and self._session_lost:
            response.success, response.message = False, "session lost: cleanup and configure the node first"
            return response
        tw = self.gate.set_armed(bool(request.data), time.monotonic())
        if tw is not None:
            self._publish_twist(tw)
        response.success = True
        response.message = "actions armed" if request.data else "actions disarmed"
        self.get_logger().info(response.message)
        return response

    # ------------------------------------------------------------------------------------------------ diagnostics
    def diagnostics_values(self) -> dict:
        with self.stats.lock:
            c = dict(self.stats.c)
            cb = list(self.stats.cb_ms)
            cb_max = self.stats.cb_max_ms
            wait = list(self.stats.wait_ms)
            wait_max = self.stats.wait_max_ms
            lat = list(self.stats.answer_s)
            last_error = self.stats.last_error
        raw = self._session_stats if self._session is not None else {}
        inner = raw.get("cache") if isinstance(raw.get("cache"), dict) else {}

        def pick(*keys, default=0):
            for src in (inner, raw):
                for k in keys:
                    if k in src and src[k] is not None:
                        return src[k]
            return default

        busy = self._busy_since
        v = {
            "state": self._state_label,
            "tokens_stored": pick("stored", "tokens_stored"),
            "tokens_budget": pick("budget", "tokens_budget", default=self._p.get("cache.budget", 0)),
            "tokens_seen": pick("seen", "tokens_seen"),
            "kv_bytes": pick("kv_bytes"),
            "evictions": pick("evictions"),
            "frames_in": c.get("frames_in", 0),
            "frames_used": c.get("frames_used", 0),
            "frames_dropped": c.get("frames_dropped", 0),
            "frames_rejected": c.get("frames_rejected", 0),
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
            "actions_accepted": self.validator.accepted if self.validator else 0,
            "actions_rejected": self.validator.rejected if self.validator else 0,
            "actions_clamped": self.validator.clamped if self.validator else 0,
            "armed": bool(self.gate and self.gate.armed),
            "cmd_vel_motion": c.get("cmd_vel_motion", 0),
            "cmd_vel_zero": c.get("cmd_vel_zero", 0),
            "errors": c.get("errors", 0),
            "resets": c.get("resets", 0),
            "memory_images": c.get("memory_images", 0),
            "session_lost": self._session_lost,
            "rss_bytes": _rss_bytes(),
            "last_error": last_error,
        }
        for prefix, src in (("cache_", inner), ("session_", raw)):
            for k, val in src.items():
                if isinstance(val, (int, float, str)) and not isinstance(val, bool) and k not in (
                        "stored", "budget", "seen", "kv_bytes", "evictions", "tokens_stored", "tokens_seen"):
                    v.setdefault(prefix + k, val)
        return v

    def _publish_diagnostics(self):
        if getattr(self, "_diag_pub", None) is None:
            return
        v = self.diagnostics_values()
        st = DiagnosticStatus()
        st.name = f"{self.get_name()}: session"
        st.hardware_id = str(self._p.get("model", ""))
        if v["session_lost"]:
            st.level, st.message = DiagnosticStatus.ERROR, "session lost"
        elif v["state"] == "unconfigured" and v["last_error"].startswith("configure"):
            st.level, st.message = DiagnosticStatus.ERROR, v["last_error"][:200]
        elif v["errors"] or v["last_error"]:
            st.level, st.message = DiagnosticStatus.WARN, v["last_error"][:200] or "errors in the session"
        else:
            st.level, st.message = DiagnosticStatus.OK, v["state"]
        st.values = [KeyValue(key=k, value=str(val)) for k, val in v.items()]
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [st]
        self._diag_pub.publish(arr)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def main(args=None):
    rclpy.init(args=args)
    node = InfMLLMNode()
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(node)
    try:
        if node.get_parameter("autostart").value:
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
            else:
                node.get_logger().error("autostart: configure failed; the node stays unconfigured")
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        try:
            node._destroy_subs()
            node._zero_velocity("shutdown")
            node._teardown()
        except Exception:
            pass
        executor.shutdown()
        node.destroy_node()
        if rclpy.ok():
            rclpy.try_shutdown()


if __name__ == "__main__":
    main()

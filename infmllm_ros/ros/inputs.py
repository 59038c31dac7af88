"""Inputs: the ``image`` and ``instruction`` subscriptions, strict decoding, rejection counting.

Image callbacks only take the serialized bytes and put them in a one-slot mailbox (latest wins; a message
replaced before it was decoded counts as ``frames_skipped``). A decode thread deserializes and converts them
(``convert.py``: header checks before decoding, so a declared size above ``max_image_pixels`` costs nothing; a
decode slower than ``max_decode_s`` is stopped) and hands the frame to the worker's mailbox. So no image work
runs on the executor: the instruction callback, the services and the motion watchdog each have their own
callback group and never wait for a JPEG/PNG decode.

Order is kept across the two paths: every image message gets a sequence number when its callback runs, and an
instruction carries the number of the newest image received before it. The worker answers it only once that
image is settled (decoded into the worker's mailbox, refused, or replaced by a newer one), or after
``max_decode_s`` plus a margin, so an image that arrived just before an instruction is part of its view even when
both arrive at once (a late publisher, a starved machine) and the instruction path is the shorter one.
"""

from __future__ import annotations

import struct
import threading
import time
import unicodedata

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from infmllm_ros.ros.convert import ImageConversionError, compressed_to_rgb, imgmsg_to_rgb
from infmllm_ros.ros.outputs import qos


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


def visible(text: str) -> bool:
    """Has at least one character that shows: not whitespace, not a control/format character (zero-width
    spaces, BOM, bidi marks), not unassigned."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf", "Cn", "Zs", "Zl", "Zp")
               for ch in text)


def image_topic(p: dict) -> str:
    """Where image_transport puts the chosen transport: raw on the base topic, compressed on <base>/compressed."""
    base = p["image_topic"]
    return base.rstrip("/") + "/compressed" if p["image_transport"] == "compressed" else base


class Inputs:
    def __init__(self, node):
        self.node = node
        self.stats = node.stats
        self.subs = []
        self.image_group = MutuallyExclusiveCallbackGroup()
        self.instruction_group = MutuallyExclusiveCallbackGroup()
        self._log_budget = [0.0, 0]  # rate limit for reject log lines: (window start, lines in window)
        self._cv = threading.Condition()
        self._raw = None  # newest undecoded image message: (bytes, t_received, seq)
        self.received_seq = 0  # image messages whose callback ran (plain ints: read without the lock)
        self.settled_seq = 0  # the newest of them decoded, refused or replaced
        self._stop = True
        self._thread: threading.Thread | None = None

    @property
    def p(self) -> dict:
        return self.node.p

    # ------------------------------------------------------------------------------------------------ lifecycle
    def create(self):
        p, n = self.p, self.node
        msg_type = CompressedImage if p["image_transport"] == "compressed" else Image
        image_qos = qos(p["image_reliability"] == "reliable", p["image_depth"])
        instr_qos = qos(True, p["instruction_depth"], p["instruction_durability"] == "transient_local")
        self._stop = False
        self._thread = threading.Thread(target=self._decode_loop, name="infmllm_decode", daemon=True)
        self._thread.start()
        self.subs = [
            n.create_subscription(msg_type, image_topic(p), self.on_image, image_qos, raw=True,
                                  callback_group=self.image_group),
            n.create_subscription(String, p["instruction_topic"], self.on_instruction, instr_qos, raw=True,
                                  callback_group=self.instruction_group),
        ]
        topics = [n.resolve_topic_name(t) for t in (image_topic(p), p["instruction_topic"])]
        n.get_logger().info(f"active: image {topics[0]} ({msg_type.__name__}, {p['image_reliability']}), "
                            f"instruction {topics[1]}")

    def destroy(self):
        for s in self.subs:
            self.node.destroy_subscription(s)
        self.subs = []
        with self._cv:
            self._stop = True
            if self._raw is not None:
                self.stats.inc("frames_skipped")
                self._raw = None
            self.settled_seq = self.received_seq  # no instruction waits on an image that will not come
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None

    # ------------------------------------------------------------------------------------------------ rejections
    def reject(self, kind: str, reason: str):
        with self.stats.lock:
            self.stats.c[f"{kind}_rejected"] += 1
            self.stats.rejects[reason.split(":")[0][:60]] += 1
            self.stats.last_error = f"{kind}: {reason}"
        now = time.monotonic()
        if now - self._log_budget[0] > 1.0:
            self._log_budget[:] = [now, 0]
        self._log_budget[1] += 1
        if self._log_budget[1] <= 20:
            self.node.get_logger().warning(f"rejected {kind}: {reason}")
        elif self._log_budget[1] == 21:
            self.node.get_logger().warning("more rejected inputs this second; counting them in /diagnostics only")

    # ------------------------------------------------------------------------------------------------ images
    def on_image(self, raw: bytes, info):
        t_ns, t0 = time.time_ns(), time.perf_counter()
        try:
            with self._cv:
                if self._raw is not None:
                    self.stats.inc("frames_skipped")  # never decoded: neither in nor rejected
                self.received_seq += 1
                self._raw = (raw, time.monotonic(), self.received_seq)
                self._cv.notify()
        finally:
            self.stats.callback((time.perf_counter() - t0) * 1e3, info, t_ns)

    def _decode_loop(self):
        while True:
            with self._cv:
                while self._raw is None and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                (raw, t_received, seq), self._raw = self._raw, None
            try:
                self.decode(raw, t_received)
            except Exception as e:  # never lose the decode thread to one frame
                self.reject("frames", f"decode failed: {type(e).__name__}: {e}")
            finally:
                self.settled_seq = seq  # after put_frame: an instruction waiting on it sees the frame
                self.node.worker.wake()

    def decode(self, raw: bytes, t_received: float):
        compressed = self.p["image_transport"] == "compressed"
        try:
            msg = deserialize_message(raw, CompressedImage if compressed else Image)
        except Exception as e:
            self.reject("frames", f"malformed message: {e}")
            return
        try:
            if not compressed and msg.encoding != msg.encoding.strip():  # cv_bridge matches encodings exactly
                raise ImageConversionError(f"unsupported encoding {msg.encoding[:40]!r} (padded)")
            limit = self.p["max_image_pixels"]
            rgb = (compressed_to_rgb(msg, limit, float(self.p["max_decode_s"])) if compressed
                   else imgmsg_to_rgb(msg, limit))
        except ImageConversionError as e:
            self.reject("frames", str(e))
            return
        st = msg.header.stamp
        self.node.worker.put_frame((rgb, st.sec + st.nanosec * 1e-9, (st.sec, st.nanosec), t_received))

    # ------------------------------------------------------------------------------------------------ instructions
    def on_instruction(self, raw: bytes, info):
        t_ns, t0 = time.time_ns(), time.perf_counter()
        try:
            limit = int(self.p["max_instruction_chars"])
            try:
                text = decode_string_cdr(raw, limit)
            except ValueError as e:
                self.reject("instructions", str(e))
                return
            if "\x00" in text:
                self.reject("instructions", "instruction contains a NUL character")
                return
            text = text.strip()
            if not visible(text):
                self.reject("instructions", "empty instruction")
                return
            if len(text) > limit:
                self.reject("instructions", f"instruction too long: {len(text)} > max_instruction_chars={limit}")
                return
            self.node.worker.put_instruction(text, self.received_seq)
        finally:
            self.stats.callback((time.perf_counter() - t0) * 1e3, info, t_ns)

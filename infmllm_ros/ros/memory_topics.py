"""``~/memory`` and ``~/memory_image``: what the bounded cache still holds, as JSON and as a thumbnail mosaic.

Threads: the node's worker (the only thread that touches the session) calls `on_frame` after each observed frame
(keeps a subsampled copy, at most THUMB_SIDE * 2 px a side) and `update(session)` after each step: it reads
`session.memory()` (a pass over the cache's stored stream indices; nothing per decoded token) and hands the record
over. A publisher thread of this module publishes the newest record on ``~/memory`` (std_msgs/String JSON,
transient_local) at most ``memory.rate`` Hz, and renders + publishes the mosaic on ``~/memory_image`` (sensor_msgs/
Image rgb8) at most ``memory.rate`` Hz and only while someone subscribes: never on a subscription callback thread.

The thumbnail store is bounded (MAX_THUMBS) and drops a frame as soon as a record shows the cache holds none of
its tokens.
"""

from __future__ import annotations

import collections
import json
import math
import threading
import time

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import String

THUMB_SIDE = 64  # px, longest side of a tile's thumbnail
LABEL_H = 14  # px under each thumbnail: kept-share bar + stamp
GAP = 4  # px between tiles
COLUMNS = 8
MAX_THUMBS = 512
BACKGROUND = (32, 32, 40)
BAR = (80, 200, 120)
BAR_BACK = (70, 70, 80)
OUTLINE = (255, 210, 0)  # evidence frames of the last answer
TEXT = (230, 230, 230)


def ros_stamp(stamp: float, exact: dict) -> dict:
    """Float seconds -> {"sec", "nanosec"}, exact when the header stamp was recorded."""
    if stamp in exact:
        sec, nsec = exact[stamp]
    else:
        sec = math.floor(stamp)
        nsec = int(round((stamp - sec) * 1e9))
    return {"sec": int(sec), "nanosec": int(nsec)}


def render_mosaic(frames: list[dict], thumbs: dict, outlined: set, t0: float | None) -> np.ndarray:
    """(H, W, 3) uint8: one tile per held frame, oldest to newest, row-major; under each thumbnail a bar of the
    share of its tokens still held and its time (s since t0); evidence frames outlined."""
    n = len(frames)
    cols = max(1, min(COLUMNS, n))
    rows = max(1, math.ceil(n / cols))
    tw, th = THUMB_SIDE, THUMB_SIDE + LABEL_H
    img = PILImage.new("RGB", (GAP + cols * (tw + GAP), GAP + rows * (th + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for k, f in enumerate(frames):
        x, y = GAP + (k % cols) * (tw + GAP), GAP + (k // cols) * (th + GAP)
        draw.rectangle([x, y, x + tw - 1, y + THUMB_SIDE - 1], fill=BAR_BACK)
        thumb = thumbs.get(f["stamp"])
        if thumb is not None:  # None: the store's bound dropped it (more frames held than MAX_THUMBS)
            t = PILImage.fromarray(thumb)
            scale = THUMB_SIDE / max(t.size)
            t = t.resize((max(1, round(t.width * scale)), max(1, round(t.height * scale))), PILImage.BILINEAR)
            img.paste(t, (x + (tw - t.width) // 2, y + (THUMB_SIDE - t.height) // 2))
        share = min(1.0, f["kept"] / f["fed"]) if f["fed"] else 0.0
        draw.rectangle([x, y + THUMB_SIDE + 1, x + tw - 1, y + THUMB_SIDE + 3], fill=BAR_BACK)
        draw.rectangle([x, y + THUMB_SIDE + 1, x + max(0, round(share * tw) - 1), y + THUMB_SIDE + 3], fill=BAR)
        label = f"{f['stamp'] - (t0 or 0.0):.1f}s"
        draw.text((x, y + THUMB_SIDE + 4), label, fill=TEXT)
        if f["stamp"] in outlined:
            draw.rectangle([x - 2, y - 2, x + tw + 1, y + THUMB_SIDE + 1], outline=OUTLINE, width=2)
    return np.asarray(img)


class MemoryTopics:
    def __init__(self, node, rate: float):
        if not rate > 0:
            raise ValueError(f"memory.rate must be > 0 (Hz), got {rate}")
        self.node, self.period = node, 1.0 / float(rate)
        latched = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        image_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                               durability=DurabilityPolicy.VOLATILE)
        self.publishers = {"memory": node.create_lifecycle_publisher(String, "~/memory", latched),
                           "memory_image": node.create_lifecycle_publisher(Image, "~/memory_image", image_qos)}
        self.lock = threading.Condition()
        self.thumbs: collections.OrderedDict = collections.OrderedDict()  # stamp_s -> small rgb
        self.exact: dict = {}  # stamp_s -> (sec, nanosec) of the header
        self.t0: float | None = None  # first frame stamp since reset (the session's time markers count from it)
        self.record: dict | None = None
        self.version = 0  # bumps with every new record or answer evidence
        self.outlined: set = set()
        self.renders = self.published = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="infmllm_memory", daemon=True)
        self._thread.start()

    # ---- worker thread -------------------------------------------------------------------------------------
    def on_frame(self, rgb: np.ndarray, stamp_s: float, stamp: tuple[int, int]) -> None:
        step = max(1, max(rgb.shape[:2]) // (2 * THUMB_SIDE))
        small = np.ascontiguousarray(rgb[::step, ::step, :3])
        with self.lock:
            self.thumbs[stamp_s] = small
            self.exact[stamp_s] = stamp
            if self.t0 is None:
                self.t0 = stamp_s
            while len(self.thumbs) > MAX_THUMBS:
                old, _ = self.thumbs.popitem(last=False)
                self.exact.pop(old, None)

    def update(self, session) -> None:
        """After each worker step: the newest memory record (a reset gives the empty one)."""
        memory = getattr(session, "memory", None)
        if not callable(memory):
            return
        record = memory()
        with self.lock:
            if not record["frames"] and not record["totals"]["stored"]:
                self.thumbs.clear()
                self.exact.clear()
                self.outlined = set()
                self.t0 = None
            held = {f["stamp"] for f in record["frames"]}
            for stamp in [s for s in self.thumbs if s not in held]:  # the cache holds none of its tokens
                del self.thumbs[stamp]
                self.exact.pop(stamp, None)
            if self.record is None or record != self.record:
                self.record = record
                self.version += 1
                self.lock.notify()

    def on_answer(self, answer) -> dict | None:
        """The answer's evidence for ``~/result`` (stamps as {"sec", "nanosec"}); its frames get outlined."""
        ev = getattr(answer, "evidence", None)
        if not ev:
            return None
        with self.lock:
            self.outlined = {f["stamp"] for f in ev["frames"]}
            self.version += 1
            out = {**ev}
            for key in ("frames", "frames_per_token"):
                out[key] = [{"stamp": ros_stamp(f["stamp"], self.exact), "weight": f["weight"]}
                            for f in ev.get(key, [])]
        return out

    # ---- publisher thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        sent_json = sent_image = -1
        next_json = next_image = 0.0
        subscribers = 0
        while True:
            with self.lock:
                if self._stop:
                    return
                version, record = self.version, self.record
                text = self._json(record) if record is not None else None
            now = time.monotonic()
            if record is not None and version != sent_json and now >= next_json:
                next_json = now + self.period
                if self._publish("memory", String(data=text)):
                    sent_json = version
                    self.published += 1
            count = self._image_subscribers()
            if count > subscribers:
                sent_image = -1  # a new viewer: the image topic is volatile, send it the current mosaic
            subscribers = count
            if record is not None and count and version != sent_image and now >= next_image and \
                    self._active("memory_image"):
                next_image = now + self.period
                with self.lock:
                    thumbs, outlined, t0 = dict(self.thumbs), set(self.outlined), self.t0
                rgb = render_mosaic(record["frames"], thumbs, outlined, t0)
                self.renders += 1
                self.node.stats.inc("memory_images")
                if self._publish("memory_image", self._image_msg(rgb)):
                    sent_image = version
            with self.lock:
                if self._stop:
                    return
                due = [t for t, pending in ((next_json, self.version != sent_json),
                                            (next_image, bool(count) and self.version != sent_image)) if pending]
                # sleep until the rate allows the next send; else until a new record (notify) or a poll for viewers
                self.lock.wait(max(min(due) - time.monotonic(), 0.01) if due else self.period)

    def _image_subscribers(self) -> int:
        pub = self.publishers.get("memory_image")
        try:
            return pub.get_subscription_count() if pub is not None else 0
        except Exception:  # destroyed by a concurrent cleanup
            return 0

    def _active(self, name: str) -> bool:
        return bool(getattr(self.publishers.get(name), "_enabled", True))  # lifecycle publisher: active state

    def _json(self, record: dict) -> str:
        frames = [{**f, "stamp": ros_stamp(f["stamp"], self.exact),
                   "t": round(f["stamp"] - (self.t0 or f["stamp"]), 3)} for f in record["frames"]]
        return json.dumps({**record, "frames": frames, "stamp": self.node.outputs.now_stamp()})

    def _image_msg(self, rgb: np.ndarray) -> Image:
        m = Image()
        m.header.stamp = self.node.get_clock().now().to_msg()
        m.header.frame_id = "memory"
        m.height, m.width = rgb.shape[:2]
        m.encoding, m.is_bigendian, m.step = "rgb8", 0, rgb.shape[1] * 3
        m.data = rgb.tobytes()
        return m

    def _publish(self, name: str, msg) -> bool:
        pub = self.publishers.get(name)
        if pub is None or not self._active(name):  # inactive: sent again at the rate once active
            return False
        try:
            pub.publish(msg)
            return True
        except Exception as e:  # destroyed by a concurrent cleanup
            self.node.get_logger().debug(f"publish {name}: {e}")
            return False

    def close(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify_all()
        self._thread.join(timeout=5.0)

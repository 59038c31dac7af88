"""Image decoding off the callback path: a 20 Hz stream of small PNGs that each declare 4096x4096 (exactly
max_image_pixels, so they are decoded: ~0.8 s each on the shared 2-core machine) while the robot moves and an
instruction arrives. The instruction is answered within a few seconds and the watchdog keeps re-sending the
motion with gaps <= 2 / watchdog_rate (issue 15 item 5: it was 20 s unanswered and 0.40 s gaps when the PNGs
were decoded inside the image callback, in the group of the instruction callback and the watchdog)."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from _harness import Client, NodeProcess, diag_values, domain

pytestmark = pytest.mark.ros

DOMAIN = domain(3)
NS = "/infmllm_node"
WATCHDOG_RATE = 10.0


def bomb_png() -> bytes:
    from PIL import Image as PILImage

    b = io.BytesIO()
    PILImage.fromarray(np.zeros((4096, 4096), np.uint8), "L").save(b, "PNG", compress_level=9)
    return b.getvalue()


def test_decode_time_bound():
    """A decode that takes longer than max_decode_s is stopped and refused (the PNG needs 0.1-0.8 s on the shared
    2-core machines; a 20 ms bound was too close to a fast machine's first blocks)."""
    from sensor_msgs.msg import CompressedImage

    from infmllm_ros.ros.convert import ImageConversionError, compressed_to_rgb

    m = CompressedImage()
    m.format, m.data = "png", bomb_png()
    t = time.monotonic()
    with pytest.raises(ImageConversionError, match="time bound"):
        compressed_to_rgb(m, 4096 * 4096, max_decode_s=0.001)  # far below one 4 kB block's decode on any machine
    stopped = time.monotonic() - t
    t = time.monotonic()
    rgb = compressed_to_rgb(m, 4096 * 4096)
    full = time.monotonic() - t
    assert rgb.shape == (4096, 4096, 3) and not rgb.any()
    assert stopped < full  # stopped part way, not after decoding everything
    print(f"bounded decode stopped after {stopped:.3f} s, full decode {full:.3f} s")


def test_png_flood_does_not_delay_instructions_or_watchdog():
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import TwistStamped
    from sensor_msgs.msg import CompressedImage
    from std_msgs.msg import String
    from std_srvs.srv import SetBool

    data = bomb_png()
    assert len(data) < 64_000
    node = NodeProcess(DOMAIN, params={
        "session_factory": "fake_session:make", "model": "fake", "image_transport": "compressed",
        "image_reliability": "reliable", "max_image_pixels": 4096 * 4096, "watchdog_rate": WATCHDOG_RATE,
        "frame_rate": 5.0, "actions.max_new_tokens": 200, "instruction_durability": "transient_local",
        "output_durability": "transient_local"})
    c = Client(DOMAIN)
    stop = threading.Event()
    try:
        c.collect(DiagnosticArray, "/diagnostics", c.qos(), "diag")
        c.collect(String, f"{NS}/result", c.qos(transient=True), "result")
        c.collect(TwistStamped, "/cmd_vel", c.qos(depth=100), "cmd_vel")
        assert c.wait_for(lambda: not node.alive() or (
            c.got("diag") and diag_values(c.got("diag")[-1]).get("state") == "active"), 60), node.log()
        img = c.node.create_publisher(CompressedImage, "/image/compressed", c.qos(depth=5))
        instr = c.node.create_publisher(String, "/instruction", c.qos(transient=True))
        assert c.wait_for(lambda: img.get_subscription_count() > 0, 10)
        assert c.call(SetBool, f"{NS}/enable_actions", SetBool.Request(data=True)).success

        def flood():
            k = 0
            while not stop.is_set():
                m = CompressedImage()
                m.header.stamp.sec, m.format, m.data = 100 + k, "png", data
                img.publish(m)
                k += 1
                time.sleep(0.05)

        th = threading.Thread(target=flood, daemon=True)
        th.start()
        time.sleep(2.0)  # the decoder is saturated now
        move = 'action: go {"action": "move", "linear_x": 0.2, "angular_z": 0.0, "duration": 3.0}'
        t0 = time.monotonic()
        instr.publish(String(data=move))
        instr.publish(String(data="what do you see?"))

        def answered(text):
            return [m for m in c.got("result") if json.loads(m.data)["instruction"] == text]

        assert c.wait_for(lambda: answered("what do you see?"), 15), node.log()[-3000:]
        took = max(t for t, m in c.msgs["result"] if json.loads(m.data)["instruction"] == "what do you see?") - t0
        time.sleep(3.5)  # the motion runs to its end under the flood
        stop.set()
        th.join(2)
        with c.lock:
            tws = [(t, m.twist.linear.x) for t, m in c.msgs["cmd_vel"] if t >= t0]
        moving = [t for t, x in tws if x != 0.0]
        gaps = np.diff(moving)
        d = diag_values(c.got("diag")[-1])
        print(f"answer after {took:.2f} s; {len(moving)} re-sends, max gap {gaps.max():.3f} s; "
              f"frames_in {d['frames_in']} skipped {d['frames_skipped']} rejected {d['frames_rejected']}")
        assert took < 5.0, took
        assert len(moving) >= 10 and gaps.max() <= 2.0 / WATCHDOG_RATE, gaps.max()
        assert d["frames_in"] >= 1 and d["callback_ms_max"] < 100  # the callback only copied bytes
        assert node.alive()
    finally:
        stop.set()
        c.close()
        node.stop()


def test_compressed_transport_subscribes_where_image_transport_publishes():
    """An image_transport camera with base topic /camera/image_raw publishes CompressedImage on
    /camera/image_raw/compressed (format "rgb8; jpeg compressed bgr8"); image_topic names the base topic."""
    from PIL import Image as PILImage
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import String

    node = NodeProcess(DOMAIN, params={
        "session_factory": "fake_session:make", "model": "fake", "image_transport": "compressed",
        "image_topic": "/camera/image_raw", "image_reliability": "reliable", "frame_rate": 20.0,
        "instruction_durability": "transient_local", "output_durability": "transient_local"})
    c = Client(DOMAIN)
    try:
        c.collect(String, f"{NS}/result", c.qos(transient=True), "result")
        comp = c.node.create_publisher(CompressedImage, "/camera/image_raw/compressed", c.qos(depth=5))
        raw = c.node.create_publisher(Image, "/camera/image_raw", c.qos(depth=5))
        assert c.wait_for(lambda: comp.get_subscription_count() > 0, 60), node.log()
        assert raw.get_subscription_count() == 0  # the raw base topic is not what the node listens to
        b = io.BytesIO()
        PILImage.fromarray(np.full((24, 32, 3), 200, np.uint8)).save(b, "JPEG")
        m = CompressedImage()
        m.header.stamp.sec, m.header.stamp.nanosec = 77, 5
        m.header.frame_id, m.format, m.data = "camera", "rgb8; jpeg compressed bgr8", b.getvalue()
        for _ in range(3):
            comp.publish(m)
            time.sleep(0.2)
        instr = c.node.create_publisher(String, "/instruction", c.qos(transient=True))
        instr.publish(String(data="seen it?"))
        r = c.wait_for(lambda: [json.loads(x.data) for x in c.got("result")], 20)
        assert r and r[-1]["frame_stamp"] == {"sec": 77, "nanosec": 5}, (r, node.log()[-2000:])
    finally:
        c.close()
        node.stop()


def test_image_received_just_before_an_instruction_is_in_its_view():
    """An image and an instruction that arrive together (a late publisher, a starved machine): the instruction
    path is shorter, but its answer still waits for that image (a PNG that takes ~0.1-0.8 s to decode here) and
    names its stamp. Failed before the order was kept: the answer came at once, from the previous frame
    (CI, bag replay: frame 5 published late, its instruction answered from frame 4)."""
    from PIL import Image as PILImage
    from sensor_msgs.msg import CompressedImage
    from std_msgs.msg import String

    node = NodeProcess(DOMAIN, params={
        "session_factory": "fake_session:make", "model": "fake", "image_transport": "compressed",
        "image_reliability": "reliable", "max_image_pixels": 4096 * 4096, "frame_rate": 20.0,
        "instruction_durability": "transient_local", "output_durability": "transient_local"})
    c = Client(DOMAIN)
    try:
        c.collect(String, f"{NS}/result", c.qos(transient=True), "result")
        img = c.node.create_publisher(CompressedImage, "/image/compressed", c.qos(depth=5))
        instr = c.node.create_publisher(String, "/instruction", c.qos(transient=True))
        assert c.wait_for(lambda: img.get_subscription_count() > 0 and instr.get_subscription_count() > 0,
                          60), node.log()

        def image(sec: int, data: bytes) -> CompressedImage:
            m = CompressedImage()
            m.header.stamp.sec, m.format, m.data = sec, "png", data
            return m

        def results():
            return [json.loads(x.data) for x in c.got("result")]

        b = io.BytesIO()
        PILImage.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(b, "PNG")
        img.publish(image(10, b.getvalue()))
        instr.publish(String(data="first view?"))
        assert c.wait_for(lambda: len(results()) == 1, 20), node.log()[-2000:]
        assert results()[0]["frame_stamp"]["sec"] == 10, results()
        slow = bomb_png()
        for k in range(3):
            img.publish(image(20 + k, slow))
            instr.publish(String(data=f"view {k}?"))
            assert c.wait_for(lambda k=k: len(results()) == 2 + k, 20), node.log()[-2000:]
            assert results()[-1]["frame_stamp"]["sec"] == 20 + k, (results()[-1], node.log()[-2000:])
    finally:
        c.close()
        node.stop()

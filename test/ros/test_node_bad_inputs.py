"""A corpus of malformed inputs (raw images, compressed images, instructions, broken CDR): each one is rejected
with a log line and counted in /diagnostics; the node stays up and answers the next valid instruction.
Two node processes: one on raw Image, one on CompressedImage (the transport is a parameter)."""

from __future__ import annotations

import io
import json
import struct
import time

import numpy as np
import pytest
from _harness import Client, NodeProcess, diag_values, domain, make_image

pytestmark = pytest.mark.ros

DOMAIN = domain(2)
COMMON = {"session_factory": "fake_session:make", "model": "fake", "frame_rate": 10.0,
          "image_reliability": "reliable", "instruction_durability": "transient_local",
          "output_durability": "transient_local", "max_instruction_chars": 4000}


def image(h=4, w=6, encoding="rgb8", step=None, data=None, stamp=(1, 0)):
    from sensor_msgs.msg import Image

    m = Image()
    m.header.stamp.sec, m.header.stamp.nanosec = stamp
    m.height, m.width, m.encoding = h, w, encoding
    m.step = w * 3 if step is None else step
    m.data = bytes(h * m.step) if data is None else data
    return m


def compressed(data: bytes, fmt="jpeg", stamp=(1, 0)):
    from sensor_msgs.msg import CompressedImage

    m = CompressedImage()
    m.header.stamp.sec, m.header.stamp.nanosec = stamp
    m.format, m.data = fmt, data
    return m


def jpeg(h=16, w=16) -> bytes:
    from PIL import Image as PILImage

    b = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(b, "JPEG")
    return b.getvalue()


def png(h=8, w=8) -> bytes:
    from PIL import Image as PILImage

    b = io.BytesIO()
    PILImage.fromarray(np.zeros((h, w, 3), np.uint8)).save(b, "PNG")
    return b.getvalue()


def string_cdr(payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) + 1 if length is None else length
    return b"\x00\x01\x00\x00" + struct.pack("<I", n) + payload + b"\x00"


def raw_image_corpus():
    from rclpy.serialization import serialize_message

    good = serialize_message(image())
    return [  # (name, message or raw CDR bytes, text expected in the log line)
        ("unknown encoding", image(encoding="weird42"), "unknown or unsupported image encoding"),
        ("empty encoding", image(encoding=""), "unknown or unsupported image encoding"),
        ("padded encoding", image(encoding=" rgb8 "), "(padded)"),  # cv_bridge matches encodings exactly
        ("bayer encoding", image(encoding="bayer_rggb8", step=6), "unknown or unsupported image encoding"),
        ("float depth", image(encoding="32FC1", step=24), "unknown or unsupported image encoding"),
        ("zero height", image(h=0, data=b""), "zero-size image"),
        ("zero width", image(w=0, step=0, data=b""), "zero-size image"),
        ("step too small", image(step=17), "step 17 is smaller"),
        ("data shorter than height*step", image(data=bytes(4 * 18 - 1)), "data too short"),
        ("padded step, unpadded data", image(step=20, data=bytes(4 * 18)), "data too short"),
        ("odd-width yuv422", image(w=5, encoding="yuv422", step=10, data=bytes(40)), "even width"),
        ("mono16 too short", image(encoding="mono16", step=12, data=bytes(24)), "data too short"),
        ("absurd dimensions", image(h=100000, w=100000, step=300000, data=bytes(16)), "image too large"),
        ("truncated CDR", good[: len(good) // 2], "malformed message"),
        ("garbage bytes", b"\x07\x07\x07\x07garbage", "malformed message"),
    ]


def compressed_corpus():
    from rclpy.serialization import serialize_message

    j = jpeg()
    good = serialize_message(compressed(j))
    return [
        ("empty data", compressed(b""), "empty CompressedImage"),
        ("truncated JPEG", compressed(j[: len(j) // 2]), "corrupt or truncated JPEG"),
        ("corrupt JPEG", compressed(b"\xff\xd8" + bytes(200)), "corrupt or truncated JPEG"),
        ("GIF payload", compressed(b"GIF89a" + bytes(30)), "neither JPEG nor PNG"),
        ("compressedDepth", compressed(png(), "16UC1; compressedDepth png"), "compressedDepth"),
        ("truncated PNG", compressed(png()[:40], "png"), "corrupt or truncated PNG"),
        ("truncated CDR", good[:20], "malformed message"),
    ]


def instruction_corpus():
    from std_msgs.msg import String

    return [
        ("empty", String(data=""), "empty instruction"),
        ("whitespace", String(data="  \n\t "), "empty instruction"),
        ("zero-width spaces", String(data="\u200b\u200b\ufeff"), "empty instruction"),
        ("control characters", String(data="\x01\x02\x1b\x7f"), "empty instruction"),
        ("huge", String(data="x" * 5000), "instruction too long"),
        ("invalid UTF-8", string_cdr(b"go \xff\xfe\x80 now"), "not valid UTF-8"),
        ("overlong UTF-8 NUL", string_cdr(b"a\xc0\x80b"), "not valid UTF-8"),
        ("NUL inside", string_cdr(b"go\x00left"), "NUL character"),  # rclpy would cut a str at the NUL
        ("length field lies", string_cdr(b"hello", length=1000), "malformed String message"),
        ("truncated CDR", b"\x00\x01\x00\x00\x50", "malformed String message"),
        ("refused by the session", String(data="__invalid__"), "session refused the instruction"),
    ]


@pytest.fixture(scope="module")
def env():
    raw = NodeProcess(DOMAIN, params=COMMON)
    comp = NodeProcess(DOMAIN, params={**COMMON, "image_transport": "compressed", "image_topic": "image_c",
                                       "instruction_topic": "instruction_c", "actions.mode": "always",
                                       "actions.max_new_tokens": 300},  # fake tokenizer: one token per char
                       ros_args=["-r", "__node:=infmllm_node_c"])
    c = Client(DOMAIN)
    try:
        yield from _setup(c, raw, comp)
    finally:
        c.close()
        rcs = raw.stop(), comp.stop()
    assert all(rc in (0, -2) for rc in rcs), rcs


def _setup(c, raw, comp):
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import String

    tl = c.qos(transient=True)
    for name in ("infmllm_node", "infmllm_node_c"):
        c.collect(String, f"/{name}/result", tl, f"{name}/result")
    c.collect(DiagnosticArray, "/diagnostics", c.qos(depth=50), "diag")
    c.pubs = {
        "image": c.node.create_publisher(Image, "/image", c.qos(depth=50)),
        "image_c": c.node.create_publisher(CompressedImage, "/image_c/compressed", c.qos(depth=50)),
        "instruction": c.node.create_publisher(String, "/instruction", c.qos(depth=50, transient=True)),
        "instruction_c": c.node.create_publisher(String, "/instruction_c", c.qos(depth=50, transient=True)),
    }
    c.raw, c.comp = raw, comp
    for name in ("infmllm_node", "infmllm_node_c"):
        ok = c.wait_for(lambda n=name: not (raw.alive() and comp.alive()) or diag_of(c, n).get("state") == "active",
                        60)
        assert ok and raw.alive() and comp.alive(), raw.log() + comp.log()
    for p in c.pubs.values():
        assert c.wait_for(lambda p=p: p.get_subscription_count() > 0, 10)
    # one valid probe frame per node, until counted: both ends of the (volatile) image topics are matched, so no
    # corpus message can be lost to the discovery race and the counts below are exact
    for node_name, pub, make in (("infmllm_node", "image", lambda: make_image(8, 8)),
                                 ("infmllm_node_c", "image_c", lambda: compressed(jpeg()))):
        def probe(node_name=node_name, pub=pub, make=make):
            c.pubs[pub].publish(make())
            return fresh(c, node_name).get("frames_in", 0) >= 1
        assert c.wait_for(probe, 20, interval=0.2), node_name
    c.probes = {n: fresh(c, n)["frames_in"] for n in ("infmllm_node", "infmllm_node_c")}
    yield c


def diag_of(c, node_name: str, since: float = 0.0) -> dict:
    with c.lock:
        arrs = [m for t, m in c.msgs.get("diag", []) if t >= since]
    for arr in reversed(arrs):
        if arr.status and arr.status[0].name.startswith(node_name + ":"):
            return diag_values(arr)
    return {}


def fresh(c, node_name):
    t = time.monotonic()
    c.wait_for(lambda: diag_of(c, node_name, t), 5)
    return diag_of(c, node_name, t)


def answered(c, node_name, text, timeout=20):
    def find():
        return [json.loads(m.data) for m in c.got(f"{node_name}/result") if json.loads(m.data)["instruction"] == text]

    r = c.wait_for(find, timeout)
    return r[-1] if r else None


def test_bad_input_corpus_rejected_counted_logged_node_survives(env):
    c = env
    frames, comp_frames, instrs = raw_image_corpus(), compressed_corpus(), instruction_corpus()
    assert len(frames) + len(comp_frames) + len(instrs) >= 20
    for _, m, _ in frames:
        c.pubs["image"].publish(m)
        time.sleep(0.08)
    for _, m, _ in comp_frames:
        c.pubs["image_c"].publish(m)
        time.sleep(0.08)
    for _, m, _ in instrs:
        c.pubs["instruction"].publish(m)
        time.sleep(0.08)

    def counts_done():
        d = fresh(c, "infmllm_node")
        return (d.get("frames_rejected") == len(frames) and d.get("instructions_rejected") == len(instrs)) and d

    d = c.wait_for(counts_done, 15)
    assert d, f"raw node counts: {fresh(c, 'infmllm_node')}\n{c.raw.log()[-4000:]}"
    assert d["rejected_inputs"] == len(frames) + len(instrs) and d["errors"] == 0
    assert d["frames_in"] == c.probes["infmllm_node"]  # no malformed frame got through
    dc = c.wait_for(lambda: (x := fresh(c, "infmllm_node_c")).get("frames_rejected") == len(comp_frames) and x, 10)
    assert dc, f"compressed node counts: {fresh(c, 'infmllm_node_c')}\n{c.comp.log()[-4000:]}"

    raw_log, comp_log = c.raw.log(), c.comp.log()
    for name, _, expect in frames + instrs:
        assert expect in raw_log, f"no log line for {name!r} (expected {expect!r})"
    for name, _, expect in comp_frames:
        assert expect in comp_log, f"no log line for {name!r} (expected {expect!r})"
    n_lines = raw_log.count("rejected frames:") + raw_log.count("rejected instructions:")
    assert n_lines == len(frames) + len(instrs), n_lines

    # both nodes stay up and answer the next valid input
    from std_msgs.msg import String

    assert c.raw.alive() and c.comp.alive()
    c.pubs["image"].publish(make_image(8, 8, stamp=(42, 7)))
    c.pubs["image_c"].publish(compressed(jpeg(), stamp=(43, 9)))
    time.sleep(0.5)
    c.pubs["instruction"].publish(String(data="are you still there?"))
    c.pubs["instruction_c"].publish(String(data="and you?"))
    r = answered(c, "infmllm_node", "are you still there?")
    assert r and r["answer"].startswith("answer to: are you still there?") and r["frame_stamp"] == {
        "sec": 42, "nanosec": 7}
    r = answered(c, "infmllm_node_c", "and you?")
    assert r and r["frame_stamp"] == {"sec": 43, "nanosec": 9}
    # actions.mode=always: the answer, then one constrained action decoding (valid action or a refusal)
    assert r["answer"].startswith("answer to: and you?") and (r["action"] is not None or r["action_error"]), r
    dc = fresh(c, "infmllm_node_c")
    assert dc["actions_accepted"] + dc["actions_rejected"] == 1 and dc["cmd_vel_motion"] == 0  # disarmed
    assert fresh(c, "infmllm_node")["_level"] == 1  # WARN: last_error is set

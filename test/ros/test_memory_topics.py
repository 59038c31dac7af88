"""~/memory and ~/memory_image with the REAL engine (tiny offline VLM in the node process, budget below one frame
so every frame evicts): JSON after evictions, mosaic tiles counted by decoding the image (uniform-colour frames on
the known mosaic background), no rendering without a subscriber, evidence on ~/result, an empty memory after ~/reset,
and both topics still working after lifecycle deactivate/activate."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from _harness import Client, NodeProcess, diag_values, domain

pytestmark = [pytest.mark.ros, pytest.mark.slow]

DOMAIN = domain(4)
NS = "/infmllm_node"
COLOUR = (200, 30, 160)  # every camera frame is this colour: its thumbnail tiles are too


@pytest.fixture(scope="module")
def env():
    pytest.importorskip("transformers")
    node = NodeProcess(DOMAIN, params={
        "model": "tiny:llava_llama", "device": "cpu", "dtype": "float32", "frame_rate": 20.0,
        "cache.budget": 80, "cache.recent": 16, "cache.window": 8, "cache.max_chunk": 128, "cache.sinks": 0,
        "generation.max_new_tokens": 4, "memory.rate": 5.0,
        "instruction_durability": "transient_local", "output_durability": "transient_local",
        "image_reliability": "reliable",
    })
    c = Client(DOMAIN)
    try:
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        c.collect(String, f"{NS}/memory", c.qos(depth=1, transient=True), "memory")
        c.collect(String, f"{NS}/result", c.qos(transient=True), "result")
        c.collect(DiagnosticArray, "/diagnostics", c.qos(), "diag")
        c.image_pub = c.node.create_publisher(Image, "/image", c.qos(depth=10))
        c.instr_pub = c.node.create_publisher(String, "/instruction", c.qos(depth=10, transient=True))
        ok = c.wait_for(lambda: not node.alive() or (
            c.got("diag") and diag_values(c.got("diag")[-1]).get("state") == "active"), 120)
        assert ok and node.alive(), f"node did not become active:\n{node.log()}"
        assert c.wait_for(lambda: c.image_pub.get_subscription_count() > 0, 10)
        c.proc = node
        yield c
    finally:
        c.close()
        rc = node.stop(timeout=20)
    assert rc in (0, -2), f"node exit code {rc}\n{node.log()[-3000:]}"


def uniform_image(sec: int):
    from sensor_msgs.msg import Image

    m = Image()
    m.header.stamp.sec, m.header.stamp.nanosec = sec, 0
    m.height, m.width, m.encoding, m.step = 32, 32, "rgb8", 96
    m.data = np.broadcast_to(np.array(COLOUR, np.uint8), (32, 32, 3)).tobytes()
    return m


def send_frames(c, secs):
    """One frame at a time, each after the previous one reached the session (latest frame wins otherwise)."""
    for s in secs:
        n = len(memories(c))
        base = memories(c)[-1]["totals"]["frames_seen"] if n else 0
        c.image_pub.publish(uniform_image(s))
        assert last_memory_with(c, lambda m, b=base: m["totals"]["frames_seen"] > b, 30, n), c.proc.log()[-2000:]


def memories(c):
    return [json.loads(m.data) for m in c.got("memory")]


def last_memory_with(c, pred, timeout=30.0, since=0):
    """The newest ~/memory record (of those received after the first `since`) that satisfies pred."""
    return c.wait_for(lambda: next((m for m in reversed(memories(c)[since:]) if pred(m)), None), timeout)


def count_tiles(msg) -> int:
    """Tiles whose thumbnail area is the frame colour, on the mosaic's grid; every other cell is plain background."""
    from infmllm_ros.ros import memory_topics as mt

    img = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)
    tiles = 0
    for y in range(mt.GAP, msg.height - mt.THUMB_SIDE, mt.THUMB_SIDE + mt.LABEL_H + mt.GAP):
        for x in range(mt.GAP, msg.width - mt.THUMB_SIDE + 1, mt.THUMB_SIDE + mt.GAP):
            cell = img[y + 8:y + mt.THUMB_SIDE - 8, x + 8:x + mt.THUMB_SIDE - 8]
            if (cell == COLOUR).all():
                tiles += 1
            else:
                assert (cell == mt.BACKGROUND).all(), "a cell is neither a frame tile nor background"
    return tiles


def test_memory_json_then_mosaic_only_with_a_subscriber(env):
    c = env
    send_frames(c, range(100, 108))
    mem = last_memory_with(c, lambda m: m["totals"]["frames_seen"] == 8)
    assert mem, f"no ~/memory after 8 frames: {memories(c)[-1:]}\n{c.proc.log()[-2000:]}"
    t = mem["totals"]
    assert t["evictions"] >= 5 and t["stored"] <= 80 + 4 and t["budget"] == 80
    assert 1 <= t["frames_held"] == len(mem["frames"]) < 8
    secs = [f["stamp"]["sec"] for f in mem["frames"]]
    assert secs == sorted(secs) and set(secs) <= set(range(100, 108)) and 107 in secs  # the newest frame is held
    assert all(0 < f["kept"] <= f["fed"] and f["kept_min"] <= f["kept"] <= f["kept_max"] for f in mem["frames"])

    # a late joiner gets the record (transient_local)
    from std_msgs.msg import String

    c.collect(String, f"{NS}/memory", c.qos(depth=1, transient=True), "memory_late")
    assert c.wait_for(lambda: c.got("memory_late"), 10)

    # nobody watched the image so far: nothing was rendered
    t0 = time.monotonic()
    assert c.wait_for(lambda: [m for tt, m in c.msgs["diag"] if tt > t0], 5)
    assert diag_values(c.got("diag")[-1])["memory_images"] == 0

    from sensor_msgs.msg import Image

    c.collect(Image, f"{NS}/memory_image", c.qos(depth=1), "image")
    img = c.wait_for(lambda: c.got("image"), 15)
    assert img, f"no ~/memory_image with a subscriber\n{c.proc.log()[-2000:]}"
    assert img[-1].encoding == "rgb8"
    assert count_tiles(img[-1]) == memories(c)[-1]["totals"]["frames_held"]


def test_evidence_on_result(env):
    from std_msgs.msg import String

    c = env
    c.instr_pub.publish(String(data="What is in front of the robot?"))
    res = c.wait_for(lambda: [json.loads(m.data) for m in c.got("result")], 60)
    assert res, c.proc.log()[-2000:]
    ev = res[-1]["evidence"]
    assert 1 <= len(ev["frames"]) <= 3
    assert all(f["stamp"]["sec"] in range(100, 108) and f["stamp"]["nanosec"] == 0 for f in ev["frames"])
    weights = [f["weight"] for f in ev["frames"]]
    assert weights == sorted(weights, reverse=True) and sum(weights) <= 1.0 + 1e-3
    assert abs(ev["frame_share"] + ev["text_share"] + ev["question_share"] - 1) < 1e-3


def test_reset_gives_an_empty_memory_and_mosaic(env):
    from std_srvs.srv import Trigger

    c = env
    n = len(memories(c))
    assert c.call(Trigger, f"{NS}/reset", Trigger.Request(), timeout=30).success
    mem = last_memory_with(c, lambda m: m["totals"]["seen"] == 0, since=n)
    assert mem and mem["frames"] == [] and mem["text"] == [] and mem["totals"]["stored"] == 0
    assert c.wait_for(lambda: c.got("image") and count_tiles(c.got("image")[-1]) == 0, 10)  # an empty mosaic
    n = len(memories(c))
    send_frames(c, range(200, 203))
    mem = last_memory_with(c, lambda m: m["totals"]["frames_seen"] == 3 and m["frames"], since=n)
    assert mem and {f["stamp"]["sec"] for f in mem["frames"]} <= {200, 201, 202}


def test_memory_topics_work_after_deactivate_activate(env):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    c = env
    for tid in (Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_ACTIVATE):
        req = ChangeState.Request()
        req.transition.id = tid
        assert c.call(ChangeState, f"{NS}/change_state", req, timeout=30).success
    assert c.wait_for(lambda: c.image_pub.get_subscription_count() > 0, 10)
    n_img, n = len(c.got("image")), len(memories(c))
    send_frames(c, range(300, 304))
    mem = last_memory_with(c, lambda m: any(f["stamp"]["sec"] == 303 for f in m["frames"]), since=n)
    assert mem, f"no ~/memory after reactivation\n{c.proc.log()[-2000:]}"
    assert c.wait_for(lambda: len(c.got("image")) > n_img, 15)
    assert c.wait_for(lambda: count_tiles(c.got("image")[-1]) == memories(c)[-1]["totals"]["frames_held"], 10)

"""The node process with model:=<real-shape fixture dir> answers on 640x480 frames. Only the automatic sizes are
passed (cache.budget / cache.max_chunk / cache.window 0, dtype auto: the defaults of issue 13) besides the test's
QoS; LLaVA-1.5's 590-token frames did not fit the former fixed max_chunk 256."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ros"))
from _harness import Client, NodeProcess, domain, make_image  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.slow]
NS = "/infmllm_node"
AUTO = {"cache.budget": 0, "cache.max_chunk": 0, "cache.window": 0, "dtype": "auto"}


@pytest.mark.parametrize("name", ["llava-1.5-7b-hf"])
def test_node_answers_with_fixture(name, fixture_dir):
    from sensor_msgs.msg import Image  # noqa: F401
    from std_msgs.msg import String

    dom = domain(4)  # test_launch_config's offset; these modules never run at the same time in one pytest
    node = NodeProcess(dom, params={"model": str(fixture_dir(name)), **AUTO, "generation.max_new_tokens": 4,
                                    "instruction_durability": "transient_local",
                                    "output_durability": "transient_local", "image_reliability": "reliable"})
    c = Client(dom)
    try:
        tl = c.qos(transient=True)
        c.collect(String, f"{NS}/result", tl, "result")
        pub = c.node.create_publisher(Image, "/image", c.qos(depth=5))
        instr = c.node.create_publisher(String, "/instruction", c.qos(depth=10, transient=True))
        assert c.wait_for(lambda: not node.alive() or pub.get_subscription_count() > 0, 180) and node.alive(), \
            node.log()[-3000:]
        for k in range(3):
            pub.publish(make_image(480, 640, seed=k, stamp=(100 + k, 0)))
            time.sleep(1.0)
        instr.publish(String(data="What is in front of the robot?"))
        got = c.wait_for(lambda: [json.loads(m.data) for m in c.got("result")], 180)
        assert got, node.log()[-3000:]
        r = json.loads(c.got("result")[-1].data)
        assert r["instruction"] == "What is in front of the robot?" and r["tokens"] >= 1, r
        assert r["frame_stamp"] is not None and r["cache"]["seen"] > 576, r  # a whole 576-token VGA frame went in
    finally:
        c.close()
        node.stop(timeout=20)

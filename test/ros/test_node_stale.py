"""A stale view (issue 15 item 5): answers state the frame age; beyond max_frame_age the answer says the view is
stale, actions are refused (no motion decided on an old picture) and /diagnostics warns. Arming only while active.
/diagnostics hardware_id names the model."""

from __future__ import annotations

import json
import time

import pytest
from _harness import Client, NodeProcess, diag_values, domain, make_image

pytestmark = pytest.mark.ros

DOMAIN = domain(1)
NS = "/infmllm_node"
MAX_AGE = 1.0


def test_stale_view_arming_only_while_active_hardware_id():
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import TwistStamped
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from std_srvs.srv import SetBool

    node = NodeProcess(DOMAIN, params={
        "session_factory": "fake_session:make", "model": "fake", "autostart": False, "max_frame_age": MAX_AGE,
        "frame_rate": 20.0, "actions.max_new_tokens": 200, "image_reliability": "reliable",
        "instruction_durability": "transient_local", "output_durability": "transient_local"})
    c = Client(DOMAIN)
    try:
        c.collect(DiagnosticArray, "/diagnostics", c.qos(), "diag")
        c.collect(String, f"{NS}/result", c.qos(transient=True), "result")
        c.collect(TwistStamped, "/cmd_vel", c.qos(depth=100), "cmd_vel")
        assert c.wait_for(lambda: c.got("diag"), 30), node.log()
        assert c.got("diag")[-1].status[0].hardware_id == "fake"

        def change(tid):
            req = ChangeState.Request()
            req.transition.id = tid
            assert c.call(ChangeState, f"{NS}/change_state", req, timeout=30).success, tid

        change(Transition.TRANSITION_CONFIGURE)
        r = c.call(SetBool, f"{NS}/enable_actions", SetBool.Request(data=True))
        assert not r.success and "inactive" in r.message  # arming only while active
        change(Transition.TRANSITION_ACTIVATE)
        t = time.monotonic()
        c.wait_for(lambda: [m for tt, m in c.msgs["diag"] if tt > t + 0.05], 5)
        assert diag_values(c.got("diag")[-1])["armed"] is False  # the refused request left it disarmed
        assert c.call(SetBool, f"{NS}/enable_actions", SetBool.Request(data=True)).success

        img = c.node.create_publisher(Image, "/image", c.qos(depth=5))
        instr = c.node.create_publisher(String, "/instruction", c.qos(transient=True))
        assert c.wait_for(lambda: img.get_subscription_count() > 0, 10)

        def ask(text):
            instr.publish(String(data=text))
            r = c.wait_for(lambda: [json.loads(m.data) for m in c.got("result")
                                    if json.loads(m.data)["instruction"] == text], 20)
            assert r, node.log()[-2000:]
            return r[-1]

        for k in range(3):
            img.publish(make_image(8, 8, seed=k, stamp=(10, k)))
            time.sleep(0.1)
        r = ask("fresh?")
        assert r["stale"] is False and 0 <= r["frame_age_s"] < MAX_AGE and not r["answer"].startswith("[stale")
        time.sleep(MAX_AGE + 0.5)  # the camera stops
        r = ask("old?")
        assert r["stale"] is True and r["frame_age_s"] > MAX_AGE and r["answer"].startswith("[stale view")
        t0 = time.monotonic()
        move = 'action: go {"action": "move", "linear_x": 0.2, "angular_z": 0.0, "duration": 1.0}'
        r = ask(move)
        assert r["action"] is None and "stale" in r["action_error"], r
        time.sleep(0.3)
        assert not [m for t, m in c.msgs["cmd_vel"] if t >= t0 and m.twist.linear.x != 0.0]
        t = time.monotonic()
        c.wait_for(lambda: [m for tt, m in c.msgs["diag"] if tt > t + 0.05], 5)
        d = diag_values(c.got("diag")[-1])
        assert d["_level"] == 1 and "stale" in d["_message"] and d["view_stale"] is True, d
        img.publish(make_image(8, 8, seed=9, stamp=(11, 0)))  # the camera is back: motion allowed again
        time.sleep(0.3)
        r = ask(move.replace("go", "go now"))
        assert r["action"] is not None and r["stale"] is False, r
        assert c.wait_for(lambda: [m for t, m in c.msgs["cmd_vel"] if t >= t0 and m.twist.linear.x == 0.2], 5)
    finally:
        c.close()
        node.stop()


def test_hardware_id_names_the_embedded_model():
    from diagnostic_msgs.msg import DiagnosticArray

    node = NodeProcess(DOMAIN, params={"autostart": False})  # model: "" (the default) = embedded
    c = Client(DOMAIN)
    try:
        c.collect(DiagnosticArray, "/diagnostics", c.qos(), "diag")
        assert c.wait_for(lambda: c.got("diag"), 30), node.log()
        assert c.got("diag")[-1].status[0].hardware_id == "embedded:robot_vlm"
    finally:
        c.close()
        node.stop()

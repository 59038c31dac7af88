"""The node in its own process over real DDS, with a scripted session (test/ros/fake_session.py):
frames + instruction -> ~/answer, ~/answer_stream, ~/result (right frame stamp), /diagnostics; parameters from
config/robot.yaml with overrides; ~/reset; actions (disarmed, armed, clamped, watchdog, fail closed);
lifecycle transitions. One node process per cmd_vel type (TwistStamped, the default, and Twist) serves the
whole module, so every action safety test runs for both types (start-up is the slow part)."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from _harness import REPO, Client, NodeProcess, diag_values, domain, make_image

pytestmark = pytest.mark.ros

DOMAIN = domain(0)
NS = "/infmllm_node"


@pytest.fixture(scope="module", params=[True, False], ids=["TwistStamped", "Twist"])
def env(request):
    stamped = request.param
    node = NodeProcess(DOMAIN, params_file=REPO / "config" / "robot.yaml", params={
        "cmd_vel_stamped": stamped, "max_frame_age": 0.0,  # frames come only in the first test
        "session_factory": "fake_session:make", "model": "fake-for-tests", "frame_rate": 5.0,
        "instruction_durability": "transient_local", "output_durability": "transient_local",
        "image_reliability": "reliable", "cache.budget": 256, "watchdog_rate": 20.0,
        "actions.max_new_tokens": 200,  # the fake tokenizer has one token per character
        # lm-format-enforcer leaves out-of-limit and non-finite numbers to the node's validator, which is what this
        # module checks end to end; xgrammar's in-grammar limits are tested in test_action_grammar.py
        "actions.grammar": "lmfe",
    }, env={"FAKE_ASK_S": "0.05"})
    c = Client(DOMAIN)
    try:
        yield from _setup(c, node, stamped)
    finally:
        c.close()
        rc = node.stop()
    assert rc in (0, -2), f"node exit code {rc}\n{node.log()[-3000:]}"


def _setup(c, node, stamped):
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import Twist, TwistStamped
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    tl = c.qos(transient=True)
    c.collect(String, f"{NS}/answer", tl, "answer")
    c.collect(String, f"{NS}/answer_stream", c.qos(depth=100), "stream")
    c.collect(String, f"{NS}/result", tl, "result")
    c.collect(String, f"{NS}/action", c.qos(), "action")
    c.stamped = stamped
    c.collect(TwistStamped if stamped else Twist, "/cmd_vel", c.qos(), "cmd_vel")
    c.collect(DiagnosticArray, "/diagnostics", c.qos(), "diag")
    c.image_pub = c.node.create_publisher(Image, "/image", c.qos(depth=5))
    c.instr_pub = c.node.create_publisher(String, "/instruction", c.qos(depth=50, transient=True))
    c.proc = node

    def say(text):
        c.instr_pub.publish(String(data=text))

    def drop_instruction_publisher():
        """Before re-activating: a re-activated node must not get the old transient-local history replayed."""
        c.node.destroy_publisher(c.instr_pub)

    def new_instruction_publisher():
        c.instr_pub = c.node.create_publisher(String, "/instruction", c.qos(depth=50, transient=True))
        assert c.wait_for(lambda: c.instr_pub.get_subscription_count() > 0, 10)

    c.say = say
    c.new_instruction_publisher = new_instruction_publisher
    c.drop_instruction_publisher = drop_instruction_publisher
    ok = c.wait_for(lambda: not node.alive() or (
        c.got("diag") and diag_values(c.got("diag")[-1]).get("state") == "active"), 60)
    assert ok and node.alive(), f"node did not become active:\n{node.log()}"
    assert c.wait_for(lambda: c.image_pub.get_subscription_count() > 0, 10)
    yield c


def last_diag(c, since: float = 0.0) -> dict:
    with c.lock:
        items = [m for t, m in c.msgs["diag"] if t >= since]
    return diag_values(items[-1]) if items else {}


def fresh_diag(c, timeout=5.0) -> dict:
    t = time.monotonic()
    c.wait_for(lambda: last_diag(c, t), timeout)
    return last_diag(c, t)


def results(c) -> list[dict]:
    return [json.loads(m.data) for m in c.got("result")]


def result_for(c, instruction: str, timeout=20.0) -> dict:
    r = c.wait_for(lambda: [x for x in results(c) if x["instruction"] == instruction], timeout)
    assert r, f"no result for {instruction!r}\n{c.proc.log()[-2500:]}"
    return r[-1]


def test_end_to_end_answer_result_diagnostics(env):
    c = env
    for k in range(10):
        c.image_pub.publish(make_image(48, 64, seed=k, stamp=(1000 + k, 250_000_000)))
        time.sleep(0.05)
    final = (2000, 123_456_789)
    for _ in range(3):  # the newest frame, sent a few times so the test does not depend on timing
        c.image_pub.publish(make_image(48, 64, seed=99, stamp=final))
        time.sleep(0.1)
    assert c.wait_for(lambda: fresh_diag(c).get("frames_used", 0) >= 1, 10)
    c.say("what is in front of the robot?")
    r = result_for(c, "what is in front of the robot?")
    assert r["answer"].startswith("answer to: what is in front of the robot?")
    assert r["frame_stamp"] == {"sec": final[0], "nanosec": final[1]}
    assert r["action"] is None and r["latency_s"] > 0 and r["cache"]["budget"] == 256
    assert c.wait_for(lambda: r["answer"] in [m.data for m in c.got("answer")], 5)
    assert c.wait_for(lambda: "".join(m.data for m in c.got("stream")).strip().endswith(r["answer"].strip()), 5)
    d = fresh_diag(c)
    for key in ("tokens_stored", "tokens_budget", "kv_bytes", "frames_in", "frames_used", "frames_dropped",
                "answer_latency_p50_s", "answer_latency_p95_s", "rejected_inputs", "last_error", "callback_ms_p95"):
        assert key in d, key
    assert d["tokens_budget"] == 256 and d["kv_bytes"] == 4096 * 256
    # reliable, but the first frames may precede the node's side of discovery: at least the repeated last ones
    assert 3 <= d["frames_in"] <= 13 and d["frames_used"] + d["frames_dropped"] == d["frames_in"]
    assert d["answers"] >= 1 and d["answer_latency_p50_s"] > 0 and d["_level"] == 0


def test_parameters_from_yaml_and_overrides(env):
    from rcl_interfaces.srv import GetParameters

    names = ["frame_rate", "cache.budget", "cache.policy", "system_prompt", "image_transport", "actions.prefix",
             "model", "generation.max_new_tokens"]
    resp = env.call(GetParameters, f"{NS}/get_parameters", GetParameters.Request(names=names))
    got = {}
    for n, v in zip(names, resp.values, strict=True):
        got[n] = v.double_value if v.type == 3 else v.integer_value if v.type == 2 else v.string_value
    assert got["frame_rate"] == 5.0 and got["cache.budget"] == 256 and got["model"] == "fake-for-tests"  # -p wins
    assert got["cache.policy"] == "saddle" and got["actions.prefix"] == "action:"  # from robot.yaml
    assert got["system_prompt"] == yaml.safe_load((REPO / "config" / "robot.yaml").read_text())["infmllm_node"][
        "ros__parameters"]["system_prompt"]
    assert got["image_transport"] == "raw" and got["generation.max_new_tokens"] == 64


def test_reset_service(env):
    from std_srvs.srv import Trigger

    c = env
    assert c.wait_for(lambda: fresh_diag(c).get("tokens_stored", 0) > 0, 5)
    resp = c.call(Trigger, f"{NS}/reset", Trigger.Request())
    assert resp.success, resp.message
    d = fresh_diag(c)
    assert d["tokens_stored"] == 0 and d["resets"] == 1
    c.say("after reset")
    r = result_for(c, "after reset")
    assert r["frame_stamp"] is None  # the reset session has seen no frame since


def twists_since(c, t0):
    with c.lock:
        msgs = [(t, m) for t, m in c.msgs["cmd_vel"] if t >= t0]
    if c.stamped:  # stamped with the node clock, in cmd_vel_frame_id
        assert all(m.header.frame_id == "base_link" and (m.header.stamp.sec or m.header.stamp.nanosec)
                   for _, m in msgs), msgs
        return [(t, m.twist.linear.x, m.twist.angular.z) for t, m in msgs]
    return [(t, m.linear.x, m.angular.z) for t, m in msgs]


def test_actions_disarmed_publish_no_velocity(env):
    c = env
    t0 = time.monotonic()
    c.say('action: go forward {"action": "move", "linear_x": 0.3, "angular_z": 0.0, "duration": 1.0}')
    r = result_for(c, 'action: go forward {"action": "move", "linear_x": 0.3, "angular_z": 0.0, "duration": 1.0}')
    assert r["action"] == {"action": "move", "linear_x": 0.3, "angular_z": 0.0, "duration": 1.0}
    assert c.wait_for(lambda: c.got("action"), 5)
    assert json.loads(c.got("action")[-1].data)["action"] == "move"
    time.sleep(0.5)
    assert twists_since(c, t0) == []  # disarmed: nothing on cmd_vel


def test_actions_armed_clamped_and_watchdog(env):
    from std_srvs.srv import SetBool

    c = env
    assert c.call(SetBool, f"{NS}/enable_actions", SetBool.Request(data=True)).success
    t0 = time.monotonic()
    text = 'action: charge! {"action": "move", "linear_x": 9.0, "angular_z": -4.0, "duration": 0.6}'
    c.say(text)
    r = result_for(c, text)
    assert r["action"]["linear_x"] == 0.5 and r["action"]["angular_z"] == -1.0
    assert set(r["action"]["clamped"]) == {"linear_x", "angular_z"}
    assert c.wait_for(lambda: [tw for tw in twists_since(c, t0) if tw[1] == 0.0 and tw[2] == 0.0], 5)
    time.sleep(0.3)
    tws = twists_since(c, t0)
    moving = [tw for tw in tws if (tw[1], tw[2]) != (0.0, 0.0)]
    zeros = [tw for tw in tws if (tw[1], tw[2]) == (0.0, 0.0)]
    assert moving and all((tw[1], tw[2]) == (0.5, -1.0) for tw in moving)  # only the clamped command
    assert len(zeros) == 1 and zeros[0][0] > moving[-1][0]  # the watchdog zeroes once, after the motion
    span = zeros[0][0] - moving[0][0]
    assert 0.4 < span < 2.0, span  # ~ the 0.6 s duration (+ timer jitter on a loaded machine)


def test_non_finite_action_fails_closed(env):
    c = env
    t0 = time.monotonic()
    text = 'action: x {"action": "move", "linear_x": 1e999, "angular_z": 0, "duration": 1}'
    before = fresh_diag(c)["actions_rejected"]
    c.say(text)
    r = result_for(c, text)
    assert r["action"] is None and "not finite" in r["action_error"]
    time.sleep(0.3)
    assert twists_since(c, t0) == []
    d = fresh_diag(c)
    assert d["actions_rejected"] == before + 1 and "not finite" in d["last_error"]


def test_session_error_zeroes_velocity(env):
    c = env
    t0 = time.monotonic()
    text = 'action: long {"action": "move", "linear_x": 0.2, "angular_z": 0.0, "duration": 3.0}'
    c.say(text)
    result_for(c, text)
    c.say("__raise__")
    assert c.wait_for(lambda: [tw for tw in twists_since(c, t0) if (tw[1], tw[2]) == (0.0, 0.0)], 5)
    zero_t = [tw for tw in twists_since(c, t0) if (tw[1], tw[2]) == (0.0, 0.0)][0][0]
    assert zero_t - t0 < 2.5  # long before the 3 s motion would have ended
    d = fresh_diag(c)
    assert d["errors"] >= 1 and "fake session failure" in d["last_error"] and d["_level"] == 1
    c.say("still alive?")
    assert result_for(c, "still alive?")["answer"].startswith("answer to: still alive?")


def test_lifecycle_transitions(env):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from std_srvs.srv import SetBool

    c = env

    def state():
        return c.call(GetState, f"{NS}/get_state", GetState.Request()).current_state.label

    def change(tid):
        req = ChangeState.Request()
        req.transition.id = tid
        assert c.call(ChangeState, f"{NS}/change_state", req, timeout=60).success, tid

    assert state() == "active"
    assert c.call(SetBool, f"{NS}/enable_actions", SetBool.Request(data=True)).success
    t0 = time.monotonic()
    change(Transition.TRANSITION_DEACTIVATE)
    assert state() == "inactive"
    assert c.wait_for(lambda: [tw for tw in twists_since(c, t0) if (tw[1], tw[2]) == (0.0, 0.0)], 5)  # zeroed
    assert fresh_diag(c)["armed"] is False  # deactivate disarms
    c.say("while inactive")
    time.sleep(1.0)
    assert not [x for x in results(c) if x["instruction"] == "while inactive"]  # no subscription, no answer
    change(Transition.TRANSITION_CLEANUP)
    assert state() == "unconfigured"
    c.drop_instruction_publisher()
    change(Transition.TRANSITION_CONFIGURE)
    change(Transition.TRANSITION_ACTIVATE)
    assert state() == "active"
    c.new_instruction_publisher()
    c.say("back again")
    assert result_for(c, "back again", timeout=30)["answer"].startswith("answer to: back again")


def test_reset_cancels_a_running_generation(env):
    from std_srvs.srv import Trigger

    c = env
    before = fresh_diag(c)
    c.say("__slow__ tell me a long story")
    assert c.wait_for(lambda: fresh_diag(c).get("worker_busy_s", 0) > 0, 5)
    t = time.monotonic()
    resp = c.call(Trigger, f"{NS}/reset", Trigger.Request())
    took = time.monotonic() - t
    assert resp.success and took < 2.0, (resp.message, took)  # did not wait for the 3 s answer to finish
    d = fresh_diag(c)
    assert d["answers_cancelled"] == before["answers_cancelled"] + 1 and d["resets"] == before["resets"] + 1
    time.sleep(0.5)
    assert not [x for x in results(c) if x["instruction"] == "__slow__ tell me a long story"]


def test_use_sim_time_stamps_from_clock_latency_from_wall(env):
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters
    from rosgraph_msgs.msg import Clock

    c = env
    req = SetParameters.Request(parameters=[Parameter(
        name="use_sim_time", value=ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=True))])
    assert c.call(SetParameters, f"{NS}/set_parameters", req).results[0].successful
    clock = c.node.create_publisher(Clock, "/clock", 10)
    stop = []

    def tick():
        sim = 5000.0
        while not stop:
            m = Clock()
            m.clock.sec, m.clock.nanosec = int(sim), int((sim % 1) * 1e9)
            clock.publish(m)
            sim += 0.01
            time.sleep(0.01)

    import threading

    th = threading.Thread(target=tick, daemon=True)
    th.start()
    try:
        time.sleep(0.5)
        c.image_pub.publish(make_image(16, 16, stamp=(5000, 42)))
        time.sleep(0.4)
        c.say("sim time question")
        r = result_for(c, "sim time question")
        assert 5000 <= r["stamp"]["sec"] < 5100  # node clock = /clock
        assert r["frame_stamp"] == {"sec": 5000, "nanosec": 42}  # from the header
        assert 0 < r["latency_s"] < 10  # wall clock, not the (slower) sim clock difference
        t = time.monotonic()
        assert c.wait_for(lambda: [m for tt, m in c.msgs["diag"] if tt > t], 5)  # diagnostics still at 1 Hz
        assert 5000 <= c.got("diag")[-1].header.stamp.sec < 5100
    finally:
        stop.append(1)
        th.join(2)
        req.parameters[0].value.bool_value = False
        c.call(SetParameters, f"{NS}/set_parameters", req)


def test_session_lost_zeroes_disarms_then_recovers(env):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    from std_srvs.srv import SetBool

    c = env
    assert c.call(SetBool, f"{NS}/enable_actions", SetBool.Request(data=True)).success
    text = 'action: go {"action": "move", "linear_x": 0.1, "angular_z": 0.0, "duration": 3.0}'
    t0 = time.monotonic()
    c.say(text)
    result_for(c, text)
    c.say("__die__")
    assert c.wait_for(lambda: fresh_diag(c).get("session_lost") is True, 10)
    zeros = [tw for tw in twists_since(c, t0) if (tw[1], tw[2]) == (0.0, 0.0)]
    assert zeros and zeros[0][0] - t0 < 2.5  # the watchdog stopped the 3 s motion early
    d = fresh_diag(c)
    assert d["_level"] == 2 and d["armed"] is False and "session lost" in d["_message"]
    assert not c.call(SetBool, f"{NS}/enable_actions", SetBool.Request(data=True)).success  # cannot re-arm
    c.drop_instruction_publisher()  # it would replay "__die__" to the re-activated node
    for tid in (Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP, Transition.TRANSITION_CONFIGURE,
                Transition.TRANSITION_ACTIVATE):
        req = ChangeState.Request()
        req.transition.id = tid
        assert c.call(ChangeState, f"{NS}/change_state", req, timeout=60).success, tid
    c.new_instruction_publisher()
    c.say("recovered?")
    assert result_for(c, "recovered?", timeout=30)["answer"].startswith("answer to: recovered?")
    assert fresh_diag(c)["session_lost"] is False

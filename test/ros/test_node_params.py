"""Parameters through the real parameter services: descriptors (description, range, read_only), one validation
applied on every set and at configure, live-safe ones applied at once, configure-only ones refused while
configured with a reason that says to reconfigure. The bad values are written here (the oracle), not derived
from the node's table: every numeric parameter refuses nan, +-inf, -1 and a huge value, and 0 unless the
parameter is one where 0 has a documented meaning."""

from __future__ import annotations

import math
import time

import pytest
from _harness import Client, NodeProcess, diag_values, domain

pytestmark = pytest.mark.ros

DOMAIN = domain(1)
NS = "/infmllm_node"
ZERO_MEANS_SOMETHING = {"max_frame_age", "cache.budget", "cache.window", "cache.max_chunk", "cache.recent",
                        "cache.sinks", "cache.bias_strength", "frame.max_side", "generation.temperature",
                        "memory.recall_frames"}  # 0 = no archive, no recall
# the values of issue 15 items 2-4, each of which once crashed the process, killed the worker or left a node that
# was active but could not answer
ISSUE_CASES = [("reset_timeout", math.inf), ("reset_timeout", 1e10), ("frame_rate", 1e-12), ("watchdog_rate", math.inf),
               ("generation.temperature", math.nan), ("generation.temperature", -1.0), ("generation.top_p", 0.0),
               ("cache.max_chunk", 1), ("max_image_pixels", -1), ("session_factory", "builtins:nonexistent_fn"),
               ("image_reliability", "bogus"), ("actions.mode", "sometimes"), ("cache.budget", 10**15)]


def numeric_params():
    from infmllm_ros.ros.parameters import PARAMS

    return {k: v for k, v in PARAMS.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def bad_values(name, default):
    vals = [math.nan, math.inf, -math.inf, -1, 1e300 if isinstance(default, float) else 2**62]
    if name not in ZERO_MEANS_SOMETHING:
        vals.append(0)
    return [float(v) if isinstance(default, float) else v for v in vals]


CASES = [(n, v) for n, d in numeric_params().items() for v in bad_values(n, d)]


def _value(v):
    from rcl_interfaces.msg import ParameterType, ParameterValue

    if isinstance(v, bool):
        return ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=v)
    if isinstance(v, int) and -2**63 <= v < 2**63:
        return ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=v)
    if isinstance(v, (int, float)):
        return ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=float(v))
    return ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=v)


def set_param(c, name, value):
    from rcl_interfaces.msg import Parameter
    from rcl_interfaces.srv import SetParameters

    req = SetParameters.Request(parameters=[Parameter(name=name, value=_value(value))])
    return c.call(SetParameters, f"{NS}/set_parameters", req).results[0]


def get_param(c, name):
    from rcl_interfaces.srv import GetParameters

    v = c.call(GetParameters, f"{NS}/get_parameters", GetParameters.Request(names=[name])).values[0]
    return {1: v.bool_value, 2: v.integer_value, 3: v.double_value, 4: v.string_value}.get(v.type)


def change(c, tid):
    from lifecycle_msgs.srv import ChangeState

    req = ChangeState.Request()
    req.transition.id = tid
    return c.call(ChangeState, f"{NS}/change_state", req, timeout=60).success


def test_unit_check_refuses_the_bad_values_and_accepts_defaults():
    from infmllm_ros.ros.parameters import PARAMS, check

    assert len(CASES) >= 5 * len(numeric_params())
    for name, v in CASES + ISSUE_CASES:
        assert check(name, v), (name, v)
    for name, default in PARAMS.items():
        assert check(name, default) is None, name
    assert check("session_factory", "builtins:print") is None  # importable and callable: refused at configure


@pytest.fixture(scope="module")
def env():
    from diagnostic_msgs.msg import DiagnosticArray

    node = NodeProcess(DOMAIN, params={"session_factory": "fake_session:make", "model": "fake",
                                       "instruction_durability": "transient_local",
                                       "output_durability": "transient_local"})
    c = Client(DOMAIN)
    c.collect(DiagnosticArray, "/diagnostics", c.qos(), "diag")
    try:
        assert c.wait_for(lambda: not node.alive() or (
            c.got("diag") and diag_values(c.got("diag")[-1]).get("state") == "active"), 60), node.log()
        c.proc = node
        yield c
    finally:
        c.close()
        rc = node.stop()
    assert rc == 0, node.log()[-3000:]


def test_every_bad_value_refused_through_set_parameters(env):
    c = env
    for name, v in CASES + ISSUE_CASES:
        before = get_param(c, name)
        r = set_param(c, name, v)
        assert not r.successful and r.reason, (name, v)
        got = get_param(c, name)
        assert got == before or (isinstance(got, float) and math.isnan(got) and math.isnan(before)), (name, got)
    assert c.proc.alive()
    ask_and_answer(c, "still answering after the bad values?")


def ask_and_answer(c, text):
    import json

    from std_msgs.msg import String

    key = "result"
    if key not in c.msgs:
        c.collect(String, f"{NS}/result", c.qos(transient=True), key)
        c.pub = c.node.create_publisher(String, "/instruction", c.qos(transient=True))
    c.pub.publish(String(data=text))
    assert c.wait_for(lambda: [m for m in c.got(key) if json.loads(m.data)["instruction"] == text], 20), \
        c.proc.log()[-3000:]


def test_descriptors(env):
    from rcl_interfaces.srv import DescribeParameters

    names = ["frame_rate", "cache.budget", "autostart", "image_transport"]
    ds = env.call(DescribeParameters, f"{NS}/describe_parameters", DescribeParameters.Request(names=names)).descriptors
    d = dict(zip(names, ds, strict=True))
    assert all(x.description for x in ds)
    assert d["frame_rate"].floating_point_range and d["frame_rate"].floating_point_range[0].from_value > 0
    assert d["cache.budget"].integer_range and d["cache.budget"].integer_range[0].from_value == 0
    assert d["autostart"].read_only and not d["cache.budget"].read_only
    assert "reconfigure" in d["cache.budget"].additional_constraints or "configure" in d[
        "cache.budget"].additional_constraints
    assert "compressed" in d["image_transport"].additional_constraints


def test_live_applied_configure_only_refused_while_active(env):
    c = env
    r = set_param(c, "frame_rate", 7.5)
    assert r.successful, r.reason
    assert get_param(c, "frame_rate") == 7.5
    assert set_param(c, "generation.max_new_tokens", 32).successful  # lower: fits the cache sized at configure
    r = set_param(c, "generation.max_new_tokens", 4096)
    assert not r.successful and "reconfigure" in r.reason
    for name, v in (("cache.budget", 128), ("image_topic", "other"), ("cmd_vel_stamped", False)):
        r = set_param(c, name, v)
        assert not r.successful and "reconfigure" in r.reason, (name, r.reason)
    assert set_param(c, "watchdog_rate", 20.0).successful
    assert set_param(c, "use_sim_time", False).successful  # not ours: passes through
    ask_and_answer(c, "after live changes")


def test_live_values_take_effect(env):
    """answer_stream and actions.mode change what the very next instruction gets, without a reconfigure."""
    import json

    from std_msgs.msg import String

    c = env
    c.collect(String, f"{NS}/answer_stream", c.qos(depth=100), "stream")
    assert set_param(c, "answer_stream", False).successful
    t = time.monotonic()
    ask_and_answer(c, "quiet please")
    time.sleep(0.3)
    assert not [m for tt, m in c.msgs["stream"] if tt >= t]
    assert set_param(c, "answer_stream", True).successful
    ask_and_answer(c, "loud again")
    assert c.wait_for(lambda: [m for tt, m in c.msgs["stream"] if tt >= t], 5)
    assert set_param(c, "actions.mode", "off").successful
    text = 'action: go {"action": "stop"}'
    ask_and_answer(c, text)
    r = [json.loads(m.data) for m in c.got("result") if json.loads(m.data)["instruction"] == text][-1]
    assert "answer to: action:" in r["answer"] and r["action"] is None and r["action_error"] is None
    assert set_param(c, "actions.mode", "prefix").successful  # the constraint was built at configure


def test_bad_values_at_start_fail_configure_then_recover():
    """Values given at start bypass the set callback: the descriptor refuses them at declaration (the node keeps
    the default and remembers why) or configure refuses them; a factory that returns no session fails configure."""
    from diagnostic_msgs.msg import DiagnosticArray
    from lifecycle_msgs.msg import Transition

    dom = domain(2)
    node = NodeProcess(dom, params={"autostart": False, "model": "fake", "frame_rate": 1e-12,
                                    "session_factory": "builtins:print"})
    c = Client(dom)
    try:
        c.collect(DiagnosticArray, "/diagnostics", c.qos(), "diag")
        assert c.wait_for(lambda: c.got("diag"), 30), node.log()

        def configure_error():
            assert not change(c, Transition.TRANSITION_CONFIGURE)
            t = time.monotonic()
            c.wait_for(lambda: [m for tt, m in c.msgs["diag"] if tt > t + 0.05], 5)
            return diag_values(c.got("diag")[-1])["last_error"]

        assert "frame_rate" in configure_error()
        assert set_param(c, "frame_rate", 2.0).successful  # unconfigured: configure-only values may be set
        assert "lacks observe" in configure_error()
        assert set_param(c, "session_factory", "fake_session:make").successful
        assert change(c, Transition.TRANSITION_CONFIGURE) and change(c, Transition.TRANSITION_ACTIVATE)
        assert node.alive()
    finally:
        c.close()
        node.stop()

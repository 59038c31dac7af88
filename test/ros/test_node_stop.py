"""Zero velocity on every way the node can stop while the robot is armed and moving: SIGINT, SIGTERM, the
lifecycle shutdown transition, and an exception out of the executor. The subscriber is this test process (another
process than the node): after the last non-zero command it must see a zero, and no non-zero command may be
published after the stop began (TwistStamped: by the header stamp, node clock = this machine's clock; Twist: by
arrival). Deactivate, a session error and worker death are in test_node_e2e (both message types too)."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from _harness import Client, NodeProcess, diag_values, domain

pytestmark = pytest.mark.ros

DOMAIN = domain(1)
NS = "/infmllm_node"
MOVE = 'action: go {"action": "move", "linear_x": 0.3, "angular_z": 0.1, "duration": 3.0}'
# a node whose ~/reset callback raises: the exception leaves executor.spin_once in main()
CRASHING = ("import sys; from infmllm_ros.ros import node as n\n"
            "def boom(self, request, response): raise RuntimeError('injected failure in a callback')\n"
            "n.InfMLLMNode._on_reset = boom\n"
            "sys.exit(n.main())")


def _twist(m, stamped):
    t = m.twist if stamped else m
    return float(t.linear.x), float(t.angular.z)


@pytest.mark.parametrize("stamped", [True, False], ids=["TwistStamped", "Twist"])
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "shutdown", "exception"])
def test_zero_velocity_on_exit(how, stamped):
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import Twist, TwistStamped
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    from std_msgs.msg import String
    from std_srvs.srv import SetBool, Trigger

    node = NodeProcess(DOMAIN, params={
        "session_factory": "fake_session:make", "model": "fake", "watchdog_rate": 20.0,
        "actions.max_new_tokens": 200, "cmd_vel_stamped": stamped, "max_frame_age": 0.0,
        "instruction_durability": "transient_local",
    }, env={"FAKE_ASK_S": "0.02"}, code=CRASHING if how == "exception" else None)
    c = Client(DOMAIN)
    got, lock = [], threading.Lock()

    def on_twist(m):
        with lock:
            got.append((time.time(), m))

    try:
        c.node.create_subscription(TwistStamped if stamped else Twist, "/cmd_vel", on_twist, c.qos(depth=100))
        c.collect(DiagnosticArray, "/diagnostics", c.qos(), "diag")
        assert c.wait_for(lambda: not node.alive() or (
            c.got("diag") and diag_values(c.got("diag")[-1]).get("state") == "active"), 60), node.log()
        assert c.call(SetBool, f"{NS}/enable_actions", SetBool.Request(data=True)).success
        pub = c.node.create_publisher(String, "/instruction", c.qos(transient=True))
        pub.publish(String(data=MOVE))
        assert c.wait_for(lambda: sum(_twist(m, stamped) != (0.0, 0.0) for _, m in list(got)) >= 3, 20), node.log()
        t_stop = time.time()
        if how in ("SIGINT", "SIGTERM"):
            node.proc.send_signal(getattr(signal, how))
        elif how == "shutdown":
            req = ChangeState.Request()
            req.transition.id = Transition.TRANSITION_ACTIVE_SHUTDOWN
            c.node.create_client(ChangeState, f"{NS}/change_state").call_async(req)
        else:
            c.node.create_client(Trigger, f"{NS}/reset").call_async(Trigger.Request())
        node.proc.wait(20)  # finalized and crashed nodes exit by themselves
        time.sleep(0.5)
        with lock:
            msgs = [(t, _twist(m, stamped), m) for t, m in got]
        moving = [i for i, (_, tw, _) in enumerate(msgs) if tw != (0.0, 0.0)]
        assert moving and [tw for _, tw, _ in msgs[moving[-1] + 1:]].count((0.0, 0.0)) >= 1, (how, msgs[-5:])
        assert msgs[-1][1] == (0.0, 0.0)
        # the stop begins when the node acts on the request (the callback raised, or the shutdown request arrived,
        # which under load can take tens of ms after it was sent): from its first zero on, nothing may move
        if how in ("exception", "shutdown"):
            t_stop = min(t for t, tw, _ in msgs if tw == (0.0, 0.0) and t >= t_stop)
        late = [(t, tw) for t, tw, m in msgs if tw != (0.0, 0.0) and (
            (m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 if stamped else t - 0.05) > t_stop)]
        assert not late, f"non-zero published after the stop at {t_stop}: {late}"
        assert node.proc.returncode == (1 if how == "exception" else 0), node.log()[-3000:]
        if how == "exception":
            assert "injected failure in a callback" in node.log()
    finally:
        c.close()
        node.stop()

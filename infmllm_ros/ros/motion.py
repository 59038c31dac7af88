"""Motion: validated actions -> the MotionGate -> ``cmd_vel``, and the watchdog that ends motions.

The gate (actions.py, no ROS) decides what may be published; this module owns the ``cmd_vel`` publisher
(``geometry_msgs/TwistStamped`` stamped with the node clock and ``cmd_vel_frame_id``, or ``Twist`` with
``cmd_vel_stamped:=false``), the watchdog timer (its own callback group: no image or instruction work can delay
it) and the stop path. A stop is sent ``ZERO_REPEATS`` times (a lossy link must still see one) and also works
after the lifecycle publisher was deactivated: stopping the robot is never gated by the lifecycle state.
"""

from __future__ import annotations

import time

from geometry_msgs.msg import Twist, TwistStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup

from infmllm_ros.actions import MotionGate
from infmllm_ros.ros.outputs import qos

ZERO_REPEATS = 3


class Motion:
    def __init__(self, node):
        self.node = node
        self.gate: MotionGate | None = None
        self.pub = None
        self.stamped = True
        self.frame_id = "base_link"
        self.timer = None
        self.group = MutuallyExclusiveCallbackGroup()
        self.worker_dead = lambda: False  # set by the node: True once the worker thread died
        self.halted = False  # set once on the way out: only zeros are published after it

    def halt(self):
        """Signal-handler safe (no lock): from now on nothing but zeros is published."""
        self.halted = True

    def create(self, p: dict, spec):
        n = self.node
        self.gate = MotionGate(spec)
        self.stamped = bool(p.get("cmd_vel_stamped", False))
        self.frame_id = str(p.get("cmd_vel_frame_id", "base_link"))
        # a plain publisher, not a lifecycle one: a zero must go out in every state (deactivate, shutdown);
        # motion itself is impossible unless armed, and arming requires the active state
        self.pub = n.create_publisher(TwistStamped if self.stamped else Twist, p["cmd_vel_topic"], qos(True, 10))
        self.set_rate(p["watchdog_rate"])

    def set_rate(self, rate: float):
        n = self.node
        if self.timer is not None:
            n.destroy_timer(self.timer)
        self.timer = n.create_timer(1.0 / float(rate), self.watchdog, clock=n.steady, callback_group=self.group)

    def destroy(self):
        n = self.node
        if self.timer is not None:
            n.destroy_timer(self.timer)
            self.timer = None
        if self.pub is not None:
            n.destroy_publisher(self.pub)
            self.pub = None

    def publish_twist(self, tw, repeats: int = 1) -> bool:
        pub = self.pub
        if pub is None or (self.halted and tuple(tw) != (0.0, 0.0)):
            return False
        if self.stamped:
            m = TwistStamped()
            m.header.stamp = self.node.get_clock().now().to_msg()
            m.header.frame_id = self.frame_id
            t = m.twist
        else:
            m = t = Twist()
        t.linear.x, t.angular.z = float(tw[0]), float(tw[1])
        ok = True
        for _ in range(repeats):
            try:
                pub.publish(m)
            except Exception as e:  # context already shut down: say so, the caller decides what else to do
                self.node.get_logger().error(f"cmd_vel publish failed: {e}")
                ok = False
                break
        self.node.stats.inc("cmd_vel_zero" if tuple(tw) == (0.0, 0.0) else "cmd_vel_motion")
        return ok

    def zero(self, why: str, disarm: bool = False, force: bool = False):
        """Stop: zero if this node may have the robot moving (or always with ``force``: on exit)."""
        if self.gate is None:
            return
        tw = self.gate.stop(why)
        if disarm:
            self.gate.set_armed(False, time.monotonic())
        if tw is not None or force:
            self.node.get_logger().info(f"zero velocity: {why}")
            self.publish_twist((0.0, 0.0), ZERO_REPEATS)

    def command(self, action):
        tw = self.gate.command(action, time.monotonic())
        if tw is not None:
            self.publish_twist(tw)
        elif action.moves_base:
            self.node.get_logger().info(f"action {action.kind} not executed: actions are disarmed")

    def set_armed(self, armed: bool):
        tw = self.gate.set_armed(armed, time.monotonic())
        if tw is not None:
            self.publish_twist(tw)

    def watchdog(self):
        if self.gate is None:
            return
        if self.worker_dead():
            if self.gate.armed or self.gate.active:
                self.zero("session lost", disarm=True)  # stays disarmed until cleanup + configure
            return
        tw = self.gate.tick(time.monotonic())
        if tw is not None:
            self.publish_twist(tw)

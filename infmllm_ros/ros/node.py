"""``infmllm_node``: the lifecycle node around one continuous StreamingSession (the glue; each concern has a home).

  parameters.py  the parameter table: declaration, descriptors, validation, which ones apply live
  inputs.py      subscriptions; image bytes -> decode thread -> worker mailbox; strict instruction decoding
  worker.py      the one thread owning the session: frame mailbox, instruction queue, resets, answers
  outputs.py     ~/answer, ~/answer_stream, ~/result, ~/action, /diagnostics, shared counters
  motion.py      actions -> MotionGate -> cmd_vel (TwistStamped or Twist), the watchdog, stopping
  snapshots.py   ~/save (queued to the worker) and memory.restore at configure (engine/snapshot.py)

Lifecycle
  configure  validate every parameter, load the actions file, build the session, start the worker, create
             publishers, services and the watchdog
  activate   create the ``image`` and ``instruction`` subscriptions (outputs start publishing)
  deactivate destroy the subscriptions, drop what is queued, zero the velocity, disarm
  cleanup    stop the worker, free the session (and CUDA memory), destroy everything configure created
  shutdown   as deactivate + cleanup; then the process exits (``finalized``)
``main()`` configures and activates unless ``autostart`` is false (a failed autostart exits 1 with the reason).

Actions (``actions.mode``): ``prefix`` (default: an instruction starting with ``actions.prefix`` is a command,
decoded constrained to the schema of ``actions.file``), ``always`` (every instruction also gets one action
decoding), ``off``. Fails closed: no constraint, invalid JSON, unknown action, non-finite number -> no action.

Stopping: zero velocity (sent several times) on SIGINT/SIGTERM (the node's own handlers: rclpy's would shut the
context down before a zero could go out), lifecycle deactivate/cleanup/shutdown/error, a session error, worker
death, and an exception out of the executor. From the moment a signal arrives no non-zero command is published.

Time: frame stamps come from message headers (``use_sim_time`` works for bag replay); latencies, rates,
motion durations and the diagnostics timer use the wall/steady clock.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from std_srvs.srv import SetBool, Trigger

from infmllm_ros.actions import ActionSpec
from infmllm_ros.ros import parameters as P
from infmllm_ros.ros.inputs import Inputs, decode_string_cdr  # noqa: F401  (decode_string_cdr: public helper)
from infmllm_ros.ros.memory_topics import MemoryTopics
from infmllm_ros.ros.motion import Motion
from infmllm_ros.ros.outputs import Outputs, Stats
from infmllm_ros.ros.parameters import PARAMS, default_actions_file  # noqa: F401  (public: launch tests, yaml)
from infmllm_ros.ros.worker import Worker

NODE_NAME = "infmllm_node"
USAGE = """usage: infmllm_node [--help] [--ros-args [--params-file FILE] [-p name:=value ...] [-r from:=to ...]]

The ROS 2 lifecycle node keeping one continuous VLM session with a bounded Inf-MLLM KV cache.
Subscribes image (sensor_msgs/Image, or CompressedImage on <image_topic>/compressed) and instruction
(std_msgs/String); publishes ~/answer, ~/answer_stream, ~/result, ~/action, cmd_vel (only while armed through
~/enable_actions) and /diagnostics; ~/save writes the session to memory.snapshot (memory.restore resumes it).
Every parameter, with its default and meaning, is in
  {params}
(ros2 launch infmllm_ros robot.launch.py uses that file; docs/ros.md describes the node.)
"""


def params_file() -> str:
    """The installed share/infmllm_ros/config/robot.yaml, else the source tree's."""
    actions = default_actions_file()
    return str(Path(actions).with_name("robot.yaml")) if actions else "config/robot.yaml (source tree)"


def model_name(model: str) -> str:
    """What /diagnostics hardware_id names: the model parameter, or the embedded model's directory name."""
    if str(model).strip():
        return str(model).strip()
    try:
        from infmllm_ros.ros.session_factory import embedded_model

        path = embedded_model()
    except Exception:  # a broken install must not stop diagnostics
        path = ""
    return f"embedded:{Path(path).name}" if path else "embedded (none installed)"


class InfMLLMNode(LifecycleNode):
    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        self.bad_overrides = P.declare_all(self)
        self.hardware_id = model_name(self.get_parameter("model").value)
        self.p: dict = {}
        self.state_label = "unconfigured"
        self.finalized = False
        self.stats = Stats()
        self.memory_topics: MemoryTopics | None = None
        self.steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.outputs = Outputs(self)
        self.motion = Motion(self)
        self.worker = Worker(self)
        self.inputs = Inputs(self)
        self.motion.worker_dead = self.worker.dead
        self._srv_group = MutuallyExclusiveCallbackGroup()
        self._diag_group = MutuallyExclusiveCallbackGroup()
        self._svc_list = []
        self.add_on_set_parameters_callback(self._on_set_parameters)
        # /diagnostics runs in every lifecycle state (steady clock: also without /clock under use_sim_time), so a
        # failed configure is visible there too
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = None
        self._diag_period(float(self.get_parameter("diagnostics_period").value))

    def _diag_period(self, period: float):
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
        self._diag_timer = self.create_timer(period, self._publish_diagnostics, clock=self.steady,
                                             callback_group=self._diag_group)

    def _publish_diagnostics(self):
        self.outputs.publish_diagnostics(self._diag_pub)

    def diagnostics_values(self) -> dict:
        return self.outputs.diagnostics_values()

    # ------------------------------------------------------------------------------------------------ parameters
    def _on_set_parameters(self, params) -> SetParametersResult:
        configured = self.state_label in ("inactive", "active")
        for prm in params:
            why = P.check(prm.name, prm.value)
            row = P.BY_NAME.get(prm.name)
            if why is None and row is not None and configured:
                if not row.live:
                    why = "takes effect at configure only: deactivate, cleanup, set it, then configure (reconfigure)"
                elif prm.name == "generation.max_new_tokens" and prm.value > self.p.get(prm.name, 0):
                    why = (f"the cache was sized for {self.p[prm.name]} new tokens at configure; a larger value "
                           "needs a reconfigure")
                elif (prm.name == "actions.mode" and prm.value != "off" and self.worker.constraint is None
                      and self.p.get("actions.mode") == "off"):
                    why = "actions.mode was off at configure (no action constraint was built): reconfigure"
            if why:
                return SetParametersResult(successful=False, reason=f"{prm.name}: {why}")
        for prm in params:
            self.bad_overrides.pop(prm.name, None)
            if configured and prm.name in P.BY_NAME:
                self._apply_live(prm.name, prm.value)
            elif prm.name == "diagnostics_period":
                self._diag_period(float(prm.value))
        return SetParametersResult(successful=True)

    def _apply_live(self, name: str, value):
        self.p[name] = [s for s in value if s] if name == "generation.stop" else value
        if name == "watchdog_rate":
            self.motion.set_rate(float(value))
        elif name == "diagnostics_period":
            self._diag_period(float(value))
        self.get_logger().info(f"parameter {name} = {value!r} (applied)")

    def _read_params(self) -> dict:
        if self.bad_overrides:
            name, why = next(iter(self.bad_overrides.items()))
            raise ValueError(f"parameter {name} {why}")
        return P.check_all({name: self.get_parameter(name).value for name in PARAMS})

    # ------------------------------------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            p = self.p = self._read_params()
            self.hardware_id = model_name(p["model"])
            afile = p["actions.file"] or default_actions_file()
            spec = ActionSpec.from_yaml(afile) if afile else ActionSpec()
            t0 = time.monotonic()
            self.worker.build(p, spec)
            self.get_logger().info(f"session ready in {time.monotonic() - t0:.1f} s (model {p['model']!r}, "
                                   f"device {p['device']}, actions file {afile or '(built-in defaults)'})")
        except Exception as e:
            self.get_logger().error(f"configure failed: {e}")
            self.stats.last_error = f"configure: {e}"
            self.worker.release()
            return TransitionCallbackReturn.FAILURE
        self.outputs.create(p)
        self.memory_topics = MemoryTopics(self, p["memory.rate"])  # ~/memory, ~/memory_image
        self.outputs.pubs.update(self.memory_topics.publishers)
        self.motion.create(p, spec)
        self._svc_list = [
            self.create_service(Trigger, "~/reset", self._on_reset, callback_group=self._srv_group),
            self.create_service(SetBool, "~/enable_actions", self._on_enable_actions, callback_group=self._srv_group),
            self.create_service(Trigger, "~/save", self._on_save, callback_group=self._srv_group),
        ]
        self.worker.start()
        self.state_label = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.inputs.create()
        self.state_label = "active"
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.state_label = "inactive"
        self.motion.zero("deactivate", disarm=True)
        self.inputs.destroy()
        self.worker.drop_pending()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.motion.zero("cleanup", disarm=True)
        self._teardown()
        self.state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.motion.zero("shutdown", disarm=True, force=self.motion.gate is not None)
        self.inputs.destroy()
        self._teardown()
        self.state_label = "finalized"
        self.finalized = True  # main() exits the process
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"lifecycle error from state {state.label}: stopping motion, releasing the session")
        self.motion.zero("error", disarm=True)
        self.inputs.destroy()
        self._teardown()
        self.state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def _teardown(self):
        self.worker.stop()
        self.worker.release()
        for s in self._svc_list:
            self.destroy_service(s)
        self._svc_list = []
        self.motion.destroy()
        if self.memory_topics is not None:
            self.memory_topics.close()
            self.memory_topics = None
        self.outputs.destroy()

    def stop_everything(self, why: str):
        """Exit path (signal, exception, finalized): zeros on a live context first, then release everything."""
        self.motion.halt()
        self.motion.zero(why, disarm=True, force=self.motion.gate is not None)
        self.inputs.destroy()
        self._teardown()

    # ------------------------------------------------------------------------------------------------ services
    def _on_reset(self, request, response):
        response.success, response.message = self.worker.request_reset(float(self.p.get("reset_timeout", 5.0)))
        return response

    def _on_save(self, request, response):
        response.success, response.message = self.worker.snapshots.request(
            float(self.p.get("memory.save_timeout", 30.0)))
        return response

    def _on_enable_actions(self, request, response):
        if self.motion.gate is None:
            response.success, response.message = False, "not configured"
            return response
        if request.data and self.state_label != "active":
            response.success, response.message = False, f"not armed: the node is {self.state_label} (activate first)"
            return response
        if request.data and self.worker.session_lost:
            response.success, response.message = False, "session lost: cleanup and configure the node first"
            return response
        self.motion.set_armed(bool(request.data))
        response.success = True
        response.message = "actions armed" if request.data else "actions disarmed"
        self.get_logger().info(response.message)
        return response


def main(args=None):
    from rclpy.signals import SignalHandlerOptions

    argv = list(sys.argv[1:] if args is None else args)
    own = argv[:argv.index("--ros-args")] if "--ros-args" in argv else argv
    if "-h" in own or "--help" in own:
        print(USAGE.format(params=params_file()))
        return 0
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node = InfMLLMNode()
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    got = []

    def on_signal(signum, frame):
        if not got:
            node.motion.halt()  # from now on only zeros reach cmd_vel (a watchdog re-send cannot slip out)
        got.append(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    rc = 0
    try:
        if node.get_parameter("autostart").value:
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
            else:  # a launch file or supervisor sees the failure; the reason is the line before (and below)
                node.get_logger().fatal(f"autostart: configure failed, exiting: {node.stats.last_error}")
                print(f"infmllm_node: {node.stats.last_error}", file=sys.stderr)
                got.append("configure failed")
                rc = 1
        while not got and not node.finalized and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        got.append("interrupt")
    except BaseException as e:  # noqa: BLE001  the robot must stop whatever went wrong
        node.get_logger().fatal(f"exception out of the executor: {type(e).__name__}: {e}")
        got.append("exception")
        rc = 1
    finally:
        try:
            node.stop_everything(got[0] if got else "exit")
        except Exception as e:
            node.get_logger().error(f"stopping: {type(e).__name__}: {e}")
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())

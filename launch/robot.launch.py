"""Start infmllm_node as a lifecycle node and bring it to active.

    ros2 launch infmllm_ros robot.launch.py model:=HuggingFaceTB/SmolVLM-256M-Instruct device:=cuda \
        image_topic:=/camera/image_raw instruction_topic:=/instruction

Arguments: model, params_file (default share/infmllm_ros/config/robot.yaml), namespace, image_topic,
instruction_topic, use_sim_time, device. Arguments left empty keep the params file's value.
The node configures and activates itself (its ``autostart`` parameter, true in robot.yaml); with
``autostart:=false`` this file drives the transitions instead through lifecycle events.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

from infmllm_ros.ros.params import node_parameters
from launch import LaunchDescription

PACKAGE = "infmllm_ros"
EXECUTABLE = "infmllm_node"
NODE_NAME = "infmllm_node"
PARAMS_FILE = os.path.join("config", "robot.yaml")


def _node(context, *args, **kwargs):
    get = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    overrides = {"use_sim_time": get("use_sim_time").lower() in ("true", "1", "yes")}
    for name in ("model", "image_topic", "instruction_topic", "device"):
        if get(name):
            overrides[name] = get(name)
    autostart = get("autostart").lower() in ("true", "1", "yes")
    overrides["autostart"] = autostart
    node = LifecycleNode(
        package=PACKAGE,
        executable=EXECUTABLE,
        name=NODE_NAME,
        namespace=get("namespace"),
        # the file's own parameter dict, so it still applies when `namespace` is set (see ros/params.py)
        parameters=[node_parameters(get("params_file"), NODE_NAME), overrides],
        output="screen",
        emulate_tty=True,
    )
    if autostart:
        return [node]
    # autostart off: configure, then activate once inactive, through lifecycle events
    configure = EmitEvent(event=ChangeState(lifecycle_node_matcher=lambda a: a is node,
                                            transition_id=Transition.TRANSITION_CONFIGURE))
    activate = RegisterEventHandler(OnStateTransition(
        target_lifecycle_node=node, goal_state="inactive",
        entities=[EmitEvent(event=ChangeState(lifecycle_node_matcher=lambda a: a is node,
                                              transition_id=Transition.TRANSITION_ACTIVATE))]))
    return [node, activate, configure]


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    return LaunchDescription([
        DeclareLaunchArgument("model", default_value="", description="HF id, local dir or tiny:<family> "
                              "('' = params file)"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, PARAMS_FILE),
                              description="parameters of infmllm_node"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node and its topics"),
        DeclareLaunchArgument("image_topic", default_value="", description="camera topic ('' = params file)"),
        DeclareLaunchArgument("instruction_topic", default_value="", description="instruction topic ('' = params)"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("device", default_value="", description="cpu, cuda, cuda:0 ('' = params file)"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="node activates itself; false = this file drives the transitions"),
        OpaqueFunction(function=_node),
    ])

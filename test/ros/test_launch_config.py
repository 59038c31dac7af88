"""launch/robot.launch.py and config/*.yaml, tested honestly without a `launch` package here:
a static check that the launch file's package, executable, node name and params file match setup.py, the node
and config/; that robot.yaml holds every parameter the node declares (each with a comment) and nothing else;
and, where real `launch` + `launch_ros` are importable, the launch description itself."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch" / "robot.launch.py"
ROBOT_YAML = REPO / "config" / "robot.yaml"
REQUIRED_ARGS = {"model", "params_file", "namespace", "image_topic", "instruction_topic", "use_sim_time", "device"}


def _constants(tree) -> dict:
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                if isinstance(node.value, ast.Call):  # os.path.join("config", "robot.yaml")
                    out[node.targets[0].id] = "/".join(ast.literal_eval(a) for a in node.value.args)
    return out


def _setup_py() -> str:
    return (REPO / "setup.py").read_text()


def test_launch_file_names_match_setup_node_and_config():
    tree = ast.parse(LAUNCH.read_text())
    k = _constants(tree)
    setup = _setup_py()
    assert re.search(r'package_name\s*=\s*"' + k["PACKAGE"] + '"', setup)
    m = re.search(r'"' + k["EXECUTABLE"] + r'\s*=\s*([\w.]+):(\w+)"', setup)
    assert m, f"console script {k['EXECUTABLE']} not in setup.py"
    mod = importlib.import_module(m.group(1))
    assert callable(getattr(mod, m.group(2)))
    from infmllm_ros.ros.node import NODE_NAME

    assert k["NODE_NAME"] == NODE_NAME
    assert (REPO / k["PARAMS_FILE"]).is_file()
    assert 'glob("config/*.yaml")' in setup and 'glob("launch/*.py")' in setup  # both get installed to share/
    assert list(yaml.safe_load(ROBOT_YAML.read_text())) == [NODE_NAME]
    declared = {c.args[0].value for c in ast.walk(tree) if isinstance(c, ast.Call)
                and getattr(c.func, "id", "") == "DeclareLaunchArgument"}
    assert REQUIRED_ARGS <= declared, REQUIRED_ARGS - declared
    src = LAUNCH.read_text()
    assert "LifecycleNode(" in src and "TRANSITION_ACTIVATE" in src and '"autostart"' in src


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_robot_yaml_holds_every_parameter_with_a_comment():
    from infmllm_ros.ros.node import NODE_NAME, PARAMS

    params = _flatten(yaml.safe_load(ROBOT_YAML.read_text())[NODE_NAME]["ros__parameters"])
    assert set(params) - {"use_sim_time"} == set(PARAMS), (set(params) ^ set(PARAMS))
    for name, default in PARAMS.items():
        v = params[name]
        if isinstance(default, float):
            assert isinstance(v, float), f"{name}: write {v} as a float in robot.yaml (ROS parameter types)"
        else:
            assert type(v) is type(default), f"{name}: {type(v).__name__} in robot.yaml, node declares {default!r}"
    for line in ROBOT_YAML.read_text().splitlines():
        s = line.strip()
        if s and not s.startswith("#") and ":" in s and not s.endswith(":"):
            assert "#" in s, f"parameter line without a comment: {line!r}"


def test_actions_file_is_the_default_actions_file():
    from infmllm_ros.actions import ActionSpec
    from infmllm_ros.ros.node import default_actions_file

    assert Path(default_actions_file()).resolve() == (REPO / "config" / "actions.yaml").resolve()
    assert ActionSpec.from_yaml(default_actions_file()).skills


def test_launch_description_with_real_launch_ros(monkeypatch):
    try:
        import launch_ros  # noqa: F401

        import launch
    except ImportError:
        pytest.skip("launch_ros is not installed here (no pip wheel); the static check above covers the names")
    if not hasattr(launch, "LaunchDescription"):
        pytest.skip("`launch` resolves to the repository's launch/ folder, not the launch package")
    import ament_index_python.packages as aip

    monkeypatch.setattr(aip, "get_package_share_directory", lambda pkg: str(REPO))
    spec = importlib.util.spec_from_file_location("robot_launch", LAUNCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ld = mod.generate_launch_description()
    from launch.actions import DeclareLaunchArgument

    names = {e.name for e in ld.entities if isinstance(e, DeclareLaunchArgument)}
    assert REQUIRED_ARGS <= names


def test_params_file_applies_in_a_namespace(tmp_path):
    """What the launch file does with params_file, emulated as launch_ros does it (a dict -> a temporary
    ``/**`` params file): robot.yaml's values reach a node launched into a namespace (the bare ``infmllm_node:``
    key alone would not match ``/robot1/infmllm_node``)."""
    from _harness import Client, NodeProcess, domain
    from rcl_interfaces.srv import GetParameters

    from infmllm_ros.ros.node import NODE_NAME
    from infmllm_ros.ros.params import flatten, node_parameters

    params = node_parameters(str(ROBOT_YAML), NODE_NAME)
    assert isinstance(params, dict) and flatten(params)["cache.policy"] == "saddle"
    wildcard = tmp_path / "wildcard.yaml"
    wildcard.write_text("/**:\n  ros__parameters:\n    frame_rate: 3.0\n")
    assert node_parameters(str(wildcard), NODE_NAME) == str(wildcard)  # other keys: the file, as written
    f = tmp_path / "launch_params.yaml"
    f.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    dom = domain(4)
    node = NodeProcess(dom, params_file=str(f), params={"session_factory": "fake_session:make", "model": "fake"},
                       ros_args=["-r", "__ns:=/robot1"])
    c = Client(dom)
    try:
        names = ["system_prompt", "cache.budget", "dtype"]
        resp = c.call(GetParameters, "/robot1/infmllm_node/get_parameters", GetParameters.Request(names=names),
                      timeout=30)
        got = [resp.values[0].string_value, resp.values[1].integer_value, resp.values[2].string_value]
        assert got == [params["system_prompt"], params["cache"]["budget"], params["dtype"]]
    finally:
        c.close()
        node.stop()


def test_failed_autostart_exits_1_with_the_reason():
    import subprocess

    from _harness import REPO as R
    from _harness import domain, node_env

    out = subprocess.run([sys.executable, "-m", "infmllm_ros.ros.node", "--ros-args", "-p", "model:=fake", "-p",
                          "session_factory:=fake_session:make", "-p", "actions.mode:=sometimes"], cwd=str(R),
                         env=node_env(domain(4)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "actions.mode" in out.stderr and "configure failed" in out.stdout + out.stderr


def test_help_prints_usage_without_starting():
    import subprocess

    from _harness import REPO as R
    from _harness import domain, node_env

    out = subprocess.run([sys.executable, "-m", "infmllm_ros.ros.node", "--help"], cwd=str(R),
                         env=node_env(domain(4)), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("usage: infmllm_node"), out.stdout + out.stderr
    assert str(ROBOT_YAML) in out.stdout  # the parameter file's location (source tree here)
    assert "session ready" not in out.stdout + out.stderr and "[INFO]" not in out.stdout + out.stderr


def test_bad_parameter_fails_configure_visibly_then_recovers():
    """autostart:=false and an invalid parameter: configure through the lifecycle service fails, the node stays up
    (unconfigured) and says why on /diagnostics (ERROR); fixing the parameter brings it up."""
    from _harness import Client, NodeProcess, diag_values, domain
    from diagnostic_msgs.msg import DiagnosticArray
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    dom = domain(4)
    node = NodeProcess(dom, params={"session_factory": "fake_session:make", "model": "fake", "autostart": False,
                                    "actions.mode": "sometimes"})
    c = Client(dom)
    try:
        c.collect(DiagnosticArray, "/diagnostics", c.qos(), "diag")
        assert c.wait_for(lambda: c.got("diag"), 30), node.log()
        ch = ChangeState.Request()
        ch.transition.id = Transition.TRANSITION_CONFIGURE
        assert not c.call(ChangeState, "/infmllm_node/change_state", ch, timeout=30).success
        t = time.monotonic()
        assert c.wait_for(lambda: [m for tt, m in c.msgs["diag"] if tt > t + 0.05], 5)
        d = diag_values(c.got("diag")[-1])
        assert d["state"] == "unconfigured" and d["_level"] == 2 and "actions.mode" in d["last_error"], d
        assert node.alive() and "configure failed" in node.log()
        req = SetParameters.Request(parameters=[Parameter(name="actions.mode", value=ParameterValue(
            type=ParameterType.PARAMETER_STRING, string_value="prefix"))])
        assert c.call(SetParameters, "/infmllm_node/set_parameters", req).results[0].successful
        for tid in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
            ch = ChangeState.Request()
            ch.transition.id = tid
            assert c.call(ChangeState, "/infmllm_node/change_state", ch, timeout=30).success
        t = time.monotonic()
        assert c.wait_for(lambda: [m for tt, m in c.msgs["diag"] if tt > t + 0.1], 5)
        assert diag_values(c.got("diag")[-1])["state"] == "active"
    finally:
        c.close()
        node.stop()

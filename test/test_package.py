"""The package builds with colcon the way a ROS 2 user builds it, and its metadata agrees with itself."""

import ast
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _setup_kwargs():
    """The keyword arguments of the setup() call in setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {kw.arg: kw.value for kw in call.keywords}


def test_package_xml_is_format_3_ament_python_with_ros_deps():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.get("format") == "3"
    assert root.findtext("name") == "infmllm_ros"
    assert root.find("export/build_type").text == "ament_python"
    deps = {e.text for e in root.iter() if e.tag.endswith("depend")}
    for dep in ("rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "diagnostic_msgs", "std_srvs"):
        assert dep in deps, dep
    for m in root.findall("maintainer"):
        email = m.get("email")
        # catkin_pkg rejects addresses like a@b.c; colcon then silently treats the package as plain python.
        assert "@" in email and len(email.split("@")[1].split(".")[-1]) >= 2, email


def test_setup_py_versions_agree_and_scripts_exist():
    kw = _setup_kwargs()
    root = ET.parse(ROOT / "package.xml").getroot()
    assert ast.literal_eval(kw["version"]) == root.findtext("version")
    scripts = ast.literal_eval(kw["entry_points"])["console_scripts"]
    for spec in scripts:
        module = spec.split("=")[1].split(":")[0].strip()
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), f"{spec}: module file missing"
    assert "tests_require" not in kw, "setuptools>=72 rejects tests_require; colcon then finds 0 tests"


@pytest.mark.skipif(shutil.which("colcon", path=str(BIN)) is None, reason="colcon not installed in this venv")
def test_colcon_build_installs_package_index_launch_config_and_scripts(tmp_path):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")  # as in an activated venv: the
    env.pop("AMENT_PREFIX_PATH", None)  # scripts' shebang is `env python3` (setup.cfg)
    build = subprocess.run(
        [str(BIN / "colcon"), "--log-base", str(tmp_path / "log"), "build", "--base-paths", str(ROOT),
         "--build-base", str(tmp_path / "build"), "--install-base", str(tmp_path / "install")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "1 package finished" in build.stdout

    # Source the workspace exactly as a user does, then ask ament_index where the package lives.
    probe = (
        "from ament_index_python.packages import get_package_share_directory as g;"
        "import os, glob; d = g('infmllm_ros'); print(d);"
        "print(sorted(os.path.basename(p) for p in glob.glob(d + '/launch/*') + glob.glob(d + '/config/*')))"
    )
    setup = tmp_path / "install" / "setup.bash"
    out = subprocess.run(["bash", "-c", f"source {setup} && {sys.executable} -c \"{probe}\""],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    share, files = out.stdout.strip().splitlines()
    assert Path(share) == tmp_path / "install" / "infmllm_ros" / "share" / "infmllm_ros"
    for name in ["robot.launch.py", "robot.yaml"] + [p.name for p in (ROOT / "config").glob("*.yaml")]:
        assert name in files, (name, files)

    # kernels/ must ship as the subpackage infmllm_ros.kernels.
    site = next((tmp_path / "install" / "infmllm_ros" / "lib").glob("python*/site-packages"))
    assert (site / "infmllm_ros" / "kernels" / "__init__.py").exists()

    # The installed console scripts start (the `ros2 run` equivalent) from the sourced workspace.
    libexec = tmp_path / "install" / "infmllm_ros" / "lib" / "infmllm_ros"
    for script in ("infmllm-replay", "infmllm-make-bag", "infmllm-record", "infmllm-bench", "infmllm_node"):
        assert (libexec / script).exists(), script
    for script in ("infmllm-replay", "infmllm-bench"):
        run = subprocess.run(["bash", "-c", f"source {setup} && {libexec / script} --help"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "usage" in run.stdout.lower(), (script, run.stdout, run.stderr)


# ROS packages are found by their import names; pip-only dependencies (no current rosdep key) are listed in a
# package.xml comment instead, and an end-of-life key would make `rosdep install` fail on a fresh robot.
_ROS_PREFIXES = ("rclpy", "rcl_interfaces", "ament_index_python", "launch", "launch_ros", "builtin_interfaces")
_EOL_KEYS = {"python3-pytorch-pip"}


def _imported_ros_packages() -> set:
    names = set()
    for path in [*(ROOT / "infmllm_ros").rglob("*.py"), *(ROOT / "launch").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for m in mods:
                top = m.split(".")[0]
                if top in _ROS_PREFIXES or top.endswith(("_msgs", "_srvs")):
                    names.add(top)
    return names


def test_package_xml_lists_every_imported_ros_package_and_no_eol_key():
    root = ET.parse(ROOT / "package.xml").getroot()
    deps = {e.text for e in root.iter() if e.tag.endswith("depend")}
    imported = _imported_ros_packages()
    assert {"rclpy", "rcl_interfaces", "ament_index_python", "rosgraph_msgs"} <= imported  # the scan sees them
    assert imported - deps == set(), f"imported but not in package.xml: {sorted(imported - deps)}"
    assert deps & _EOL_KEYS == set()


def test_install_requires_has_every_runtime_pip_dependency():
    reqs = {ast.literal_eval(e).split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip()
            for e in _setup_kwargs()["install_requires"].elts}
    for name in ("torch", "transformers", "rosbags", "xgrammar", "lm-format-enforcer", "av", "numpy", "pillow"):
        assert name in reqs, name

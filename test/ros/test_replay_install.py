"""The tools as `ros2 run infmllm_ros <tool>` finds them after `colcon build`.

colcon's ament_python build runs `setup.py build` + `setup.py install --prefix P --single-version-externally-
managed`; ros2 run looks for executables in P/lib/<package>/. This does that install into a temporary prefix
(no colcon needed) and runs each tool's --help from there, outside the source tree.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("setup.py", "setup.cfg", "package.xml", "resource", "launch", "config", "infmllm_ros", "kernels")
TOOLS = ("infmllm-record", "infmllm-replay", "infmllm-make-bag", "infmllm-bench")  # infmllm_node: existence only


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    root = tmp_path_factory.mktemp("colcon")
    src, prefix = root / "src", root / "install"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build", "--build-base", str(root / "build"),
                           "install", "--prefix", str(prefix), "--record", str(root / "files.txt"),
                           "--single-version-externally-managed"], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return prefix


def _run(prefix: Path, tool: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    site = next(prefix.glob("lib/python3*/site-packages"))
    # the scripts run with the python3 first on PATH (setup.cfg: env python3), here as in an activated venv
    env = dict(os.environ, PYTHONPATH=str(site), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([str(prefix / "lib" / "infmllm_ros" / tool), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_every_console_script_is_where_ros2_run_looks(prefix):
    installed = {p.name for p in (prefix / "lib" / "infmllm_ros").iterdir()}
    assert set(TOOLS) | {"infmllm_node"} <= installed, installed
    assert not (prefix / "bin").exists()  # nothing lands on PATH: `ros2 run infmllm_ros <tool>` is the way
    for tool in installed:  # not the interpreter that ran the build (colcon's own python lacks the venv's packages)
        assert (prefix / "lib" / "infmllm_ros" / tool).read_text().startswith("#!/usr/bin/env python3\n"), tool


@pytest.mark.parametrize("tool", TOOLS)
def test_installed_tool_prints_its_help(prefix, tmp_path, tool):
    proc = _run(prefix, tool, "--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {tool}"), proc.stderr[-2000:]
    assert f"ros2 run infmllm_ros {tool}" in proc.stdout  # the help shows how to run it after colcon build


def test_installed_tools_use_the_installed_package(prefix, tmp_path):
    site = next(prefix.glob("lib/python3*/site-packages"))
    proc = subprocess.run([sys.executable, "-c", "import infmllm_ros.ros.record as r; print(r.__file__)"],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True)
    assert Path(proc.stdout.strip()).is_relative_to(site), proc.stdout + proc.stderr
    assert (prefix / "share" / "infmllm_ros" / "package.xml").is_file()
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / "infmllm_ros").is_file()

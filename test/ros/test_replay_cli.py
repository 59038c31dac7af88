"""Command-line behaviour of the bag tools: help, progress bar, --loop with Ctrl-C, ROS arguments, bag summary."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import replay_support as rs  # noqa: E402

DOMAIN = rs.domain(4)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return rs.make_video_bag(tmp_path_factory.mktemp("cli") / "b", "--resize", "64x48", "--max-frames", 6)


@pytest.mark.parametrize("name, words", [("infmllm-replay", "--start-offset"), ("infmllm-record", "--max-messages"),
                                         ("infmllm-record", "--reindex"), ("infmllm-make-bag", "--compressed")])
def test_help(name, words):
    proc = rs.run(name, "--help", domain=DOMAIN)
    assert proc.returncode == 0 and words in proc.stdout and f"usage: {name}" in proc.stdout


@pytest.mark.parametrize("args, words", [
    ((), "give an output bag and --topics"), (("out",), "give an output bag and --topics"),
    (("--reindex", "x", "--topics", "/a"), "--reindex BAG takes no output bag"),
    (("--reindex", "/nonexistent/bag"), "bag not found"),
    (("out", "--topics", "/a:std_msgs/msg/String", "--flush-interval", "0"), "--flush-interval must be"),
    (("out", "--topics", "/a:std_msgs/msg/String", "--flush-messages", "0"), "--flush-messages")])
def test_record_argument_errors(tmp_path, args, words):
    proc = subprocess.run(rs.command("infmllm-record") + list(args), cwd=tmp_path, env=rs.env(DOMAIN),
                          capture_output=True, text=True, timeout=60)
    line = rs.one_line_error(proc, "infmllm-record")
    assert proc.returncode == 1 and words in line, line
    assert not (tmp_path / "out").exists()


def test_progress_bar_and_summary(small):
    proc = rs.run("infmllm-replay", small, "--rate", 10, "--progress", "always", domain=DOMAIN)
    assert proc.returncode == 0, proc.stderr
    # one self-rewriting line ('\r'; text mode shows it as a newline): bag time / bag duration, messages sent
    assert "] " in proc.stderr and "/ 2.95 s" in proc.stderr and "9/9 msgs" in proc.stderr
    assert "[########################]" in proc.stderr  # reaches the end
    assert "sent 9 messages" in proc.stderr.splitlines()[-1]
    quiet = rs.run("infmllm-replay", small, "--rate", 0, "--quiet", domain=DOMAIN)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_loop_until_ctrl_c(small):
    proc = subprocess.Popen(rs.cli("infmllm-replay", small, "--rate", "5", "--loop", "--clock",
                                   "--ros-args", "-r", "__node:=player"),
                            env=rs.env(DOMAIN), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3.5)  # start-up + at least two 0.1 s loops at 5x
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "[interrupted]" in err
    sent = int(err.split("sent ")[1].split()[0])
    assert sent > 2 * 9, err


def test_bag_summary(small):
    proc = subprocess.run([sys.executable, "-m", "infmllm_ros.ros.bag", str(small)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "/image  sensor_msgs/msg/Image  6 msgs" in proc.stdout and "messages: 9" in proc.stdout

"""Bad bags and bad arguments: one clear error line, non-zero exit, no traceback (infmllm-replay, infmllm-record)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rosbags.rosbag2 import Writer

sys.path.insert(0, str(Path(__file__).parent))
import replay_support as rs  # noqa: E402

from infmllm_ros.ros import bag  # noqa: E402

DOMAIN = rs.domain(2)
REPLAY = "infmllm-replay"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    return {s: rs.make_video_bag(root / s, "--resize", "64x48", "--max-frames", 6, "--storage", s)
            for s in ("mcap", "sqlite3")}


def copy_bag(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate_storage(path: Path) -> Path:
    (f,) = [p for p in path.iterdir() if p.suffix in (".mcap", ".db3")]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return path


def unknown_type_bag(path: Path, with_known: bool = False) -> Path:
    with Writer(path, version=9) as w:
        c = w.add_connection("/mystery", "foo_msgs/msg/Bar", msgdef="int32 x\n", rihs01="RIHS01_" + "0" * 64)
        w.write(c, 1_000_000_000, b"\x00\x01\x00\x00\x07\x00\x00\x00")
        if with_known:
            s = bag.add_connection(w, "/instruction", "std_msgs/msg/String")
            msg = bag.typestore().types["std_msgs/msg/String"](data="hi")
            w.write(s, 1_100_000_000, bag.serialize(msg, "std_msgs/msg/String"))
    return path


def empty_bag(path: Path, with_topic: bool) -> Path:
    w = bag.open_writer(path)
    if with_topic:
        bag.add_connection(w, "/image", "sensor_msgs/msg/Image")
    w.close()
    return path


CASES = {
    "missing path": (lambda tmp, good: tmp / "nope", "bag not found"),
    "truncated mcap": (lambda tmp, good: truncate_storage(copy_bag(good["mcap"], tmp / "b")), "cannot open bag"),
    "truncated sqlite3": (lambda tmp, good: truncate_storage(copy_bag(good["sqlite3"], tmp / "b")),
                          "database disk image is malformed"),
    "missing metadata": (lambda tmp, good: _unlink(copy_bag(good["mcap"], tmp / "b"), "metadata.yaml"),
                         "has no metadata.yaml"),
    "garbage metadata": (lambda tmp, good: _write(copy_bag(good["mcap"], tmp / "b"), "metadata.yaml", "{{{ no"),
                         "Could not load YAML"),
    "not a bag": (lambda tmp, good: _write(tmp, "notes.txt", "hello"), "Unrecognized storage format"),
    "unknown type": (lambda tmp, good: unknown_type_bag(tmp / "b"), "unknown message type 'foo_msgs/msg/Bar'"),
    "empty bag": (lambda tmp, good: empty_bag(tmp / "b", with_topic=True), "is empty"),
    "no topics": (lambda tmp, good: empty_bag(tmp / "b", with_topic=False), "has no topics"),
}


def _unlink(path: Path, name: str) -> Path:
    (path / name).unlink()
    return path


def _write(path: Path, name: str, text: str) -> Path:
    (path / name).write_text(text)
    return path / name if name.endswith(".txt") else path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_bag_gives_one_line_error(tmp_path, good, case):
    make, words = CASES[case]
    proc = rs.run(REPLAY, make(tmp_path, good), "--rate", 0, domain=DOMAIN, timeout=60)
    line = rs.one_line_error(proc, REPLAY)
    assert proc.returncode == 1 and words in line, line


def test_missing_metadata_hint_works(tmp_path, good):
    """The error names the storage file, and replaying that file directly works."""
    line = rs.one_line_error(rs.run(REPLAY, CASES["missing metadata"][0](tmp_path, good), domain=DOMAIN), REPLAY)
    storage_file = line.rsplit(": ", 1)[1]
    assert storage_file.endswith(".mcap")
    proc = rs.run(REPLAY, storage_file, "--rate", 0, domain=DOMAIN)
    assert proc.returncode == 0 and "sent 9 messages" in proc.stderr, proc.stderr


def test_skip_unknown_plays_the_rest(tmp_path):
    path = unknown_type_bag(tmp_path / "b", with_known=True)
    line = rs.one_line_error(rs.run(REPLAY, path, "--rate", 0, domain=DOMAIN), REPLAY)
    assert "foo_msgs/msg/Bar" in line
    proc = rs.run(REPLAY, path, "--rate", 0, "--skip-unknown", domain=DOMAIN)
    assert proc.returncode == 0, proc.stderr
    assert "skipping /mystery (foo_msgs/msg/Bar)" in proc.stderr and "sent 1 messages" in proc.stderr


@pytest.mark.parametrize("args, words, code", [
    (["--topics", "/nope"], "topic(s) not in bag: /nope", 1),
    (["--start-offset", "100"], "nothing to play after --start-offset", 1),
    (["--remap", "image"], "bad --remap", 1),
    (["--rate", "-1"], "--rate must be >= 0", 1),
    (["--wait-for-subscribers", "1", "--wait-timeout", "1"], "timed out after 1 s waiting for 1 subscriber", 2),
])
def test_bad_replay_arguments(good, args, words, code):
    proc = rs.run(REPLAY, good["mcap"], "--rate", 0, *args, domain=DOMAIN, timeout=60)
    line = rs.one_line_error(proc, REPLAY)
    assert proc.returncode == code and words in line, line


@pytest.mark.parametrize("args, words, code", [
    (["{out}", "--topics", "/x:foo_msgs/msg/Bar"], "unknown message type 'foo_msgs/msg/Bar'", 1),
    (["{exists}", "--topics", "/x:std_msgs/msg/String"], "already exists", 1),
    (["{out}", "--topics", "/never", "--discovery-timeout", "1"], "not found in the graph after 1 s: /never", 2),
])
def test_bad_record_arguments(tmp_path, args, words, code):
    (tmp_path / "exists").mkdir()
    args = [a.format(out=tmp_path / "out", exists=tmp_path / "exists") for a in args]
    proc = rs.run("infmllm-record", *args, domain=DOMAIN, timeout=60)
    line = rs.one_line_error(proc, "infmllm-record")
    assert proc.returncode == code and words in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, args", [("infmllm-replay", ["--rate", "0"]),
                                        ("infmllm-record", ["--topics", "/a:std_msgs/msg/String"])])
def test_bad_ros_setup(tmp_path, good, name, args):
    target = good["mcap"] if name == "infmllm-replay" else tmp_path / "out"
    line = rs.one_line_error(rs.run(name, target, *args, "--ros-args", "-r", "nonsense", domain=DOMAIN), name,
                             ros_log_ok=True)
    assert "cannot start ROS" in line and "remap rule" in line
    proc = subprocess.run(rs.command(name) + [str(target), *args], env=rs.env(DOMAIN) | {"ROS_DOMAIN_ID": "999"},
                          capture_output=True, text=True, timeout=60)
    assert "not a domain id from 0 to 232" in rs.one_line_error(proc, name)
    assert not (tmp_path / "out").exists()

"""Interrupt safety of infmllm-record: SIGINT / SIGTERM mid-stream leave a valid bag with everything received.

The player streams real video frames at 1x in its own process; the recorder is stopped half-way. The bag must open,
hold exactly the number of messages the recorder reports, and those must be an unbroken prefix of the source
stream, identical field by field.
"""

import resource
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import replay_support as rs  # noqa: E402

from infmllm_ros.ros import bag  # noqa: E402

DOMAIN = rs.domain(1)
FRAMES = 50  # 5 s at 10 fps


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return rs.make_video_bag(tmp_path_factory.mktemp("src") / "b", "--resize", "128x96", "--max-frames", FRAMES)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_recording_leaves_valid_complete_bag(tmp_path, source, sig):
    rec = rs.Recorder(tmp_path / "rec", ["/image:sensor_msgs/msg/Image", "/instruction:std_msgs/msg/String"],
                      DOMAIN, "--qos", "reliable")
    play = None
    play_log = tmp_path / "play.log"
    try:
        rec.wait_ready()
        play = rs.start_replay(source, play_log, DOMAIN)
        rs.wait_until_sent(play_log, 15, play)  # 1.5 s of frames on the wire, 3.5 s still to come
        assert rec.stop(sig) == 0, rec.text()
        assert play.wait(60) == 0, play_log.read_text()  # the player does not care that a subscriber left
    finally:
        rec.stop(signal.SIGKILL)
        if play and play.poll() is None:
            play.kill()
    assert f"stopped: {sig.name}" in rec.text()
    wrote = int(rec.text().split("wrote ")[1].split()[0])
    reader = bag.open_reader(tmp_path / "rec")  # metadata.yaml present and consistent
    assert reader.message_count == wrote
    reader.close()
    recorded = bag.read_all(tmp_path / "rec")
    src = bag.read_all(source)
    assert 0 < len(recorded) == wrote < len(src)
    for i, (a, b) in enumerate(zip(src, recorded, strict=False)):  # an unbroken prefix of the stream, identical
        assert a[0] == b[0], f"message {i}: {a[0]} != {b[0]}"
        rs.assert_same_message(a[3], b[3], f"message {i}")


def test_duration_and_max_messages_stop_by_themselves(tmp_path, source):
    t0 = time.monotonic()
    proc = rs.run("infmllm-record", tmp_path / "idle", "--topics", "/image:sensor_msgs/msg/Image",
                  "--duration", 1.0, "--storage", "sqlite3", domain=DOMAIN)
    assert proc.returncode == 0 and "stopped: duration" in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 15
    reader = bag.open_reader(tmp_path / "idle")  # valid, empty
    assert reader.message_count == 0 and [c.topic for c in reader.connections] == ["/image"]
    reader.close()
    rec = rs.Recorder(tmp_path / "some", ["/image:sensor_msgs/msg/Image"], DOMAIN, "--qos", "reliable",
                      "--max-messages", 7)
    try:
        rec.wait_ready()
        play = rs.run("infmllm-replay", source, "--rate", 0, "--topics", "/image", "--wait-for-subscribers", "1",
                      domain=DOMAIN)
        assert play.returncode == 0, play.stderr
        assert rec.wait(30) == 0, rec.text()
    finally:
        rec.stop(signal.SIGKILL)
    assert "stopped: max-messages" in rec.text()
    assert len(bag.read_all(tmp_path / "some")) == 7


def _file_size_limit(limit: int):
    def apply():  # in the recorder process: writes past `limit` bytes fail with EFBIG, like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_full_disk_is_a_clean_error(tmp_path, storage):
    src = rs.make_video_bag(tmp_path / "src", "--max-frames", 12)  # 768x576 rgb8: 1.3 MB a frame
    rec = rs.Recorder(tmp_path / "rec", ["/image:sensor_msgs/msg/Image"], DOMAIN, "--qos", "reliable",
                      "--storage", storage, preexec_fn=_file_size_limit(4_000_000))
    try:
        rec.wait_ready()
        play = rs.run("infmllm-replay", src, "--rate", 0, "--topics", "/image", "--wait-for-subscribers", 1,
                      domain=DOMAIN)
        assert play.returncode == 0, play.stderr
        rc = rec.wait(30)
    finally:
        rec.stop(signal.SIGKILL)
    assert rc == 1 and "Traceback" not in rec.text(), rec.text()
    assert f"infmllm-record: error: writing {tmp_path / 'rec'} failed" in rec.text()
    assert "stopped: write failed" in rec.text()

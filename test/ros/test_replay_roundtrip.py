"""Round trip on real video: infmllm-make-bag -> infmllm-replay -> infmllm-record (each in its own process).

Every message is compared on deserialized fields (not CDR bytes: serializers differ in padding); none may be
lost at rate 1 or 10, with mcap and sqlite3.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import replay_support as rs  # noqa: E402

from infmllm_ros.ros import bag  # noqa: E402

DOMAIN = rs.domain(0)
FRAMES = 36  # 3.5 s of vtest.avi at its native 10 fps


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {storage: rs.make_video_bag(root / storage, "--resize", "192x144", "--max-frames", FRAMES,
                                       "--storage", storage) for storage in ("mcap", "sqlite3")}


def assert_same_bag(source: Path, recorded: Path, topic_map=None):
    src = rs.by_topic(bag.read_all(source))
    got = rs.by_topic(bag.read_all(recorded))
    topic_map = topic_map or {t: t for t in src}
    for topic, new in topic_map.items():
        assert len(got.get(new, [])) == len(src[topic]), f"{topic}: {len(got.get(new, []))} of {len(src[topic])}"
        for i, ((_, a), (_, b)) in enumerate(zip(src[topic], got[new], strict=True)):
            rs.assert_same_message(a, b, f"{topic}[{i}]")
    return src, got


@pytest.mark.parametrize("storage, rate", [("mcap", 1), ("mcap", 10), ("sqlite3", 1), ("sqlite3", 10)])
def test_round_trip_loses_nothing(tmp_path, bags, storage, rate):
    rec = rs.Recorder(tmp_path / "rec", ["/image:sensor_msgs/msg/Image", "/instruction:std_msgs/msg/String"],
                      DOMAIN, "--storage", storage, "--qos", "reliable")
    try:
        rec.wait_ready()
        play = rs.run("infmllm-replay", bags[storage], "--rate", rate, "--wait-for-subscribers", "1",
                      domain=DOMAIN, timeout=60)
        assert play.returncode == 0, play.stderr
        assert f"sent {FRAMES + 3} messages" in play.stderr
    finally:
        assert rec.stop() == 0, rec.text()
    assert f"wrote {FRAMES + 3} messages" in rec.text()
    src, got = assert_same_bag(bags[storage], tmp_path / "rec")
    # recorded timing follows the bag's, scaled by the rate (3.5 s of bag -> 3.5 s at 1x, 0.35 s at 10x)
    span_bag = (src["/image"][-1][0] - src["/image"][0][0]) / 1e9
    span_rec = (got["/image"][-1][0] - got["/image"][0][0]) / 1e9
    assert span_bag / rate * 0.9 - 0.05 <= span_rec <= span_bag / rate * 1.3 + 0.3, (span_bag, span_rec)
    # each instruction is recorded between the frames it sits between in the source bag. At rate 10 an
    # instruction is 5 ms from its neighbouring frames: when both wait in the recorder's executor together they are
    # taken in subscription order (CI once saw one recorded after the next frame), so there it may move by one frame
    merged = [topic for _, topic in sorted((t, topic) for topic, items in got.items() for t, _ in items)]
    src_order = [topic for _, topic in sorted((t, topic) for topic, items in src.items() for t, _ in items)]
    if rate == 1:
        assert merged == src_order
    else:
        where = [[i for i, topic in enumerate(order) if topic == "/instruction"] for order in (merged, src_order)]
        assert all(abs(a - b) <= 1 for a, b in zip(*where, strict=True)), where


def test_record_discovers_types_remap_topics_offset_compressed(tmp_path):
    src = rs.make_video_bag(tmp_path / "jpeg", "--resize", "160x120", "--max-frames", 20, "--compressed")
    cmd = rs.cli("infmllm-replay", src, "--rate", "0", "--topics", "/image", "--remap",
                 "/image:=/camera/image/compressed", "--start-offset", "1.0", "--wait-for-subscribers", "1",
                 "--delay", "0.5")
    import subprocess

    play = subprocess.Popen(cmd, env=rs.env(DOMAIN), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # no type given: the recorder finds it in the graph, and matches the player's transient_local QoS
        rec = rs.Recorder(tmp_path / "rec", ["/camera/image/compressed"], DOMAIN, "--max-messages", 10)
        assert rec.wait(60) == 0, rec.text()
        _, err = play.communicate(timeout=60)
        assert play.returncode == 0, err
    finally:
        play.kill()
    got = rs.by_topic(bag.read_all(tmp_path / "rec"))
    assert list(got) == ["/camera/image/compressed"]
    expected = [m for _, m in rs.by_topic(bag.read_all(src))["/image"]][10:]  # frames at t >= 1.0 s
    assert len(got["/camera/image/compressed"]) == 10
    for a, (_, b) in zip(expected, got["/camera/image/compressed"], strict=True):
        rs.assert_same_message(a, b)


def test_clock_follows_bag_time(tmp_path, bags):
    rec = rs.Recorder(tmp_path / "rec", ["/clock:rosgraph_msgs/msg/Clock", "/image:sensor_msgs/msg/Image"],
                      DOMAIN, "--qos", "volatile")
    try:
        rec.wait_ready()
        play = rs.run("infmllm-replay", bags["mcap"], "--rate", 5, "--clock", 100, "--topics", "/image",
                      "--wait-for-subscribers", "1", "--delay", "0.5", domain=DOMAIN, timeout=60)
        assert play.returncode == 0, play.stderr
    finally:
        assert rec.stop() == 0, rec.text()
    got = rs.by_topic(bag.read_all(tmp_path / "rec"))
    frames = [rs.stamp_ns(m) for _, m in got["/image"]]
    clock = [m.clock.sec * 10**9 + m.clock.nanosec for _, m in got["/clock"]]
    assert len(frames) == FRAMES
    assert len(clock) > FRAMES  # one before every message plus 100 Hz in between
    assert clock == sorted(clock) and clock[0] == frames[0] and clock[-1] == frames[-1]
    assert set(frames) <= set(clock)  # /clock is published at each frame's stamp right before the frame


def test_fast_replay_waits_for_slow_subscriber(tmp_path):
    """As fast as possible (--rate 0) with a short history (--depth 10): back-pressure, not loss."""
    src = rs.make_video_bag(tmp_path / "big", "--resize", "384x288", "--max-frames", 80)
    rec = rs.Recorder(tmp_path / "rec", ["/image:sensor_msgs/msg/Image", "/instruction:std_msgs/msg/String"],
                      DOMAIN, "--qos", "reliable")
    try:
        rec.wait_ready()
        play = rs.run("infmllm-replay", src, "--rate", 0, "--depth", 10, "--wait-for-subscribers", 1,
                      domain=DOMAIN, timeout=120)
        assert play.returncode == 0, play.stderr
    finally:
        assert rec.stop() == 0, rec.text()
    assert_same_bag(src, tmp_path / "rec")

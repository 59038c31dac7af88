"""A SIGKILLed infmllm-record loses at most its last flush interval, and `--reindex` makes the rest a valid bag.

A player streams 40 String messages a second (reliable) in its own process; the recorder is SIGKILLed at a
random point (seed in the failure message). Before the repair no reader opens the bag (no metadata.yaml; the
error names the repair); after `infmllm-record --reindex` it opens with rosbags, holds >= 90 % of what the player
had sent when the kill came, as an unbroken prefix of the source identical byte for byte, and metadata.yaml
(rebuilt) still names the distro and the topic's offered QoS. Both storage formats.
"""

import random
import signal
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

sys.path.insert(0, str(Path(__file__).parent))
import replay_support as rs  # noqa: E402

from infmllm_ros.ros import bag  # noqa: E402

DOMAIN = rs.domain(5)
COUNT, PERIOD_NS = 240, 25_000_000  # 6 s at 40 Hz


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "strings"
    writer = bag.open_writer(path)
    conn = bag.add_connection(writer, "/instruction", "std_msgs/msg/String")
    make = bag.typestore().types["std_msgs/msg/String"]
    for i in range(COUNT):  # distinct payloads of varying length, so a reordering or a torn one cannot pass
        writer.write(conn, 1_000_000_000 + i * PERIOD_NS, bag.serialize(make(data=f"msg {i} " + "x" * (i % 37)),
                                                                        "std_msgs/msg/String"))
    writer.close()
    return path


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_sigkill_loses_at_most_the_flush_interval(tmp_path, source, storage):
    seed = random.randrange(10**6)
    kill_at = random.Random(seed).randrange(80, 200)
    where = f"seed {seed}, kill after {kill_at} sent, {storage}"
    out = tmp_path / "rec"
    rec = rs.Recorder(out, ["/instruction:std_msgs/msg/String"], DOMAIN, "--qos", "reliable",
                      "--storage", storage, "--flush-interval", "0.1")
    play = None
    play_log = tmp_path / "play.log"
    try:
        rec.wait_ready()
        play = rs.start_replay(source, play_log, DOMAIN)
        rs.wait_until_sent(play_log, kill_at, play)
        sent = rs.sent_so_far(play_log)  # a lower bound: the progress line lags by up to 0.1 s
        rec.stop(signal.SIGKILL)
        assert play.wait(60) == 0, play_log.read_text()
    finally:
        rec.stop(signal.SIGKILL)
        if play and play.poll() is None:
            play.kill()
    assert not (out / "metadata.yaml").exists(), where
    with pytest.raises(bag.BagError, match="--reindex"):
        bag.open_reader(out)

    fixed = rs.run("infmllm-record", "--reindex", out, domain=DOMAIN)
    assert fixed.returncode == 0 and "reindexed" in fixed.stderr, fixed.stderr + where
    recorded = bag.read_all(out)
    src = bag.read_all(source)
    print(f"{where}: recovered {len(recorded)} of {sent} sent")
    assert len(recorded) >= 0.9 * sent, f"{len(recorded)} of {sent} sent recovered ({where})"
    assert len(recorded) <= COUNT
    for i, (a, b) in enumerate(zip(src, recorded, strict=False)):  # an unbroken prefix, identical payloads
        assert (b[0], b[1], b[3].data) == (a[0], a[1], a[3].data), f"message {i} ({where})"

    meta = YAML(typ="safe").load((out / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["storage_identifier"] == storage and meta["message_count"] == len(recorded)
    assert meta["ros_distro"] not in ("", "rosbags")
    (topic,) = meta["topics_with_message_count"]
    (qos,) = topic["topic_metadata"]["offered_qos_profiles"]  # the player's publisher, as offered
    assert (qos["reliability"], qos["durability"]) == ("reliable", "transient_local"), qos

"""bag_writer + bag_reindex without ROS: what a killed recorder leaves on disk, and its repair.

A "killed" bag is a copy of the storage file(s) taken while the writer is still open (what a SIGKILL leaves:
no metadata.yaml, no mcap footer, a sqlite3 WAL). The oracle is the list of messages written before the last
flush; a torn tail (a chunk cut in half) must be dropped, not misread.
"""

import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from infmllm_ros.ros import bag, bag_reindex
from infmllm_ros.ros.record import bag_qos

STRING = "std_msgs/msg/String"


def payload(i: int) -> bytes:
    return bag.serialize(bag.typestore().types[STRING](data=f"message {i} " + "y" * (i % 29)), STRING)


def snapshot(writer, folder: Path, keep_bytes: int | None = None) -> Path:
    """The bag folder as a SIGKILL would leave it now (optionally with the storage file cut at keep_bytes)."""
    folder.mkdir()
    for f in writer.path.iterdir():
        shutil.copyfile(f, folder / f.name.replace(writer.path.name, folder.name))
    if keep_bytes is not None:
        (mcap,) = folder.glob("*.mcap")
        with open(mcap, "r+b") as fh:
            fh.truncate(keep_bytes)
    return folder


def written(path: Path) -> list[tuple[str, int, bytes]]:
    reader = bag.open_reader(path)
    try:
        return [(c.topic, t, bytes(raw)) for c, t, raw in bag.iter_messages(reader)]
    finally:
        reader.close()


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_killed_bag_is_repaired_to_what_was_flushed(tmp_path, storage):
    writer = bag.open_writer(tmp_path / "live", storage=storage, flush_interval=3600)  # flushes only when asked
    conn = bag.add_connection(writer, "/chat", STRING)
    for i in range(50):
        writer.write(conn, 10**9 + i, payload(i))
    writer.flush()
    for i in range(50, 60):  # not flushed: a SIGKILL now loses these
        writer.write(conn, 10**9 + i, payload(i))
    killed = snapshot(writer, tmp_path / "killed")
    writer.close()
    with pytest.raises(bag.BagError, match="--reindex"):
        bag.open_reader(killed)

    result = bag_reindex.reindex(killed)
    assert (result["messages"], result["topics"]) == (50, 1)
    assert written(killed) == [("/chat", 10**9 + i, payload(i)) for i in range(50)]
    suffix = ".mcap" if storage == "mcap" else ".db3"
    assert sorted(f.name for f in killed.iterdir()) == sorted(["metadata.yaml", "killed" + suffix])  # no -wal left


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_flush_every_n_messages(tmp_path, storage):
    writer = bag.open_writer(tmp_path / "live", storage=storage, flush_messages=10)  # no time-based flush
    conn = bag.add_connection(writer, "/chat", STRING)
    for i in range(25):
        writer.write(conn, 10**9 + i, payload(i))
    killed = snapshot(writer, tmp_path / "killed")
    writer.close()
    assert bag_reindex.reindex(killed)["messages"] == 20  # two flushes of 10; the last 5 were still in memory
    assert written(killed) == [("/chat", 10**9 + i, payload(i)) for i in range(20)]


def test_torn_mcap_chunk_is_dropped(tmp_path):
    writer = bag.open_writer(tmp_path / "live", flush_interval=3600)
    conn = bag.add_connection(writer, "/chat", STRING)
    for i in range(30):
        writer.write(conn, 10**9 + i, payload(i))
    writer.flush()
    good = writer.storage.bio.tell()
    for i in range(30, 45):
        writer.write(conn, 10**9 + i, payload(i))
    writer.flush()
    torn = snapshot(writer, tmp_path / "torn", keep_bytes=good + (writer.storage.bio.tell() - good) // 2)
    writer.close()
    result = bag_reindex.reindex(torn, tmp_path / "fixed")
    assert result["messages"] == 30 and result["dropped_bytes"] > 0 and "cut short" in result["cut"]
    assert written(tmp_path / "fixed") == [("/chat", 10**9 + i, payload(i)) for i in range(30)]


def test_reindex_of_a_closed_bag_keeps_everything(tmp_path):
    writer = bag.open_writer(tmp_path / "closed")
    conn = bag.add_connection(writer, "/chat", STRING)
    for i in range(20):
        writer.write(conn, 10**9 + i, payload(i))
    writer.close()
    before = written(tmp_path / "closed")
    assert bag_reindex.reindex(tmp_path / "closed")["dropped_bytes"] == 0
    assert written(tmp_path / "closed") == before


def test_not_a_recording_is_a_clean_error(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "x.mcap").write_bytes(b"hello world, not an mcap")
    with pytest.raises(bag.BagError, match="not an mcap file"):
        bag_reindex.reindex(tmp_path / "x")
    assert bag_reindex.main([str(tmp_path / "missing")]) == 1
    (tmp_path / "x" / "x.mcap").write_bytes(b"")  # killed before anything reached the file
    with pytest.raises(bag.BagError, match="nothing to recover"):
        bag_reindex.reindex(tmp_path / "x")


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_metadata_names_the_distro_and_the_offered_qos(tmp_path, monkeypatch, storage):
    from rclpy.qos import qos_profile_sensor_data

    monkeypatch.setenv("ROS_DISTRO", "jazzy")
    writer = bag.open_writer(tmp_path / "b", storage=storage)
    conn = bag.add_connection(writer, "/scan", STRING, qos=[bag_qos(qos_profile_sensor_data)])
    writer.write(conn, 1, payload(0))
    writer.close()
    meta = YAML(typ="safe").load((tmp_path / "b" / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["ros_distro"] == "jazzy"
    (topic,) = meta["topics_with_message_count"]
    (qos,) = topic["topic_metadata"]["offered_qos_profiles"]  # rosbag2 v9 form: a list of mappings, names
    assert qos == {"history": "keep_last", "depth": 5, "reliability": "best_effort", "durability": "volatile",
                   "deadline": {"sec": 0, "nsec": 0}, "lifespan": {"sec": 0, "nsec": 0},
                   "liveliness": "system_default", "liveliness_lease_duration": {"sec": 0, "nsec": 0},
                   "avoid_ros_namespace_conventions": False}
    # the QoS survives a repair (read back from the mcap channel record / the sqlite3 topics table)
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    (tmp_path / "c" / "metadata.yaml").unlink()
    bag_reindex.reindex(tmp_path / "c")
    again = YAML(typ="safe").load((tmp_path / "c" / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert again["topics_with_message_count"][0]["topic_metadata"]["offered_qos_profiles"] == [qos]
    monkeypatch.delenv("ROS_DISTRO")
    assert bag.open_writer(tmp_path / "d").close() is None
    meta = YAML(typ="safe").load((tmp_path / "d" / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["ros_distro"] == "kilted"

"""A rosbags Writer whose recordings survive SIGKILL, and whose metadata names a real ROS distro.

rosbags' own writers keep everything since the last 1 MiB in memory (mcap: the open chunk) or in one open
transaction (sqlite3), so a killed recorder left an mcap without its last MiB and without a footer, and a
sqlite3 bag with no messages at all (the transaction is rolled back). Here, at least every `flush_interval`
seconds and every `flush_messages` messages, the mcap chunk is closed and written through to the file, and the
sqlite3 transaction is committed (WAL journal, so a commit is an append). What a SIGKILL loses is at most that;
`bag_reindex` turns what is left into a complete bag (summary, footer, metadata.yaml).
"""

from __future__ import annotations

import os
import time
from io import StringIO

from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.rosbag2.storage_mcap import McapWriter
from rosbags.rosbag2.storage_sqlite3 import Sqlite3Writer
from ruamel.yaml import YAML


def ros_distro() -> str:
    """The distro a bag is recorded under: $ROS_DISTRO (a sourced ROS install), else kilted (our typestore)."""
    return os.environ.get("ROS_DISTRO", "").strip() or "kilted"


def _yaml() -> YAML:
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False  # as rosbags writes metadata.yaml
    return yaml


def _with_distro(metadata_text: str) -> str:
    """rosbags writes `ros_distro: rosbags` into the metadata it embeds in the storage file: name the distro."""
    data = _yaml().load(metadata_text)
    data["ros_distro"] = ros_distro()
    out = StringIO()
    _yaml().dump(data, out)
    return out.getvalue().strip()


class _McapStorage(McapWriter):
    def flush(self) -> None:
        if self.chunk.msgs:  # a chunk with messages: close it (a complete record on disk) and write it through
            self.close_chunk()
        self.bio.flush()

    def close(self, version: int, metadata: str) -> None:
        super().close(version, _with_distro(metadata))


class _Sqlite3Storage(Sqlite3Writer):
    def __init__(self, path, compression) -> None:
        super().__init__(path, compression)
        self.conn.execute("PRAGMA journal_mode=WAL")  # a commit appends to the -wal file; no rewrite, no fsync
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("UPDATE schema SET ros_distro = ?", (ros_distro(),))
        self.conn.commit()

    def flush(self) -> None:
        self.conn.commit()

    def close(self, version: int, metadata: str) -> None:
        self.cursor.execute("INSERT INTO metadata(metadata_version, metadata) VALUES(?, ?)",
                            (version, _with_distro(metadata)))
        self.conn.commit()
        self.conn.execute("PRAGMA journal_mode=DELETE")  # a closed bag is one .db3 file, as ros2 bag leaves it
        self.conn.execute("PRAGMA optimize")
        self.conn.close()


class DurableWriter(Writer):
    """rosbags Writer + `flush()` (also done by `write` every `flush_interval` s and every `flush_messages`
    messages; None = only rosbags' own 1 MiB chunks, for bags made offline) + ros_distro in metadata.yaml."""

    STORAGE_PLUGINS = {StoragePlugin.SQLITE3: _Sqlite3Storage, StoragePlugin.MCAP: _McapStorage}

    def __init__(self, path, *, version, storage_plugin, flush_interval: float | None = None,
                 flush_messages: int | None = None) -> None:
        super().__init__(path, version=version, storage_plugin=storage_plugin)
        self.flush_interval, self.flush_messages = flush_interval, flush_messages
        self._flushed_at = time.monotonic()
        self._unflushed = 0  # messages written since the last flush

    def write(self, connection, timestamp: int, data) -> None:
        super().write(connection, timestamp, data)
        self._unflushed += 1
        if self.flush_messages is not None and self._unflushed >= self.flush_messages:
            self.flush()
        else:
            self.flush_if_due()

    def flush(self) -> None:
        """Make everything written so far survive a SIGKILL of this process."""
        if self.storage is not None:
            self.storage.flush()
        self._flushed_at, self._unflushed = time.monotonic(), 0

    def flush_if_due(self) -> None:
        """Called by `write`, and by a recorder's idle loop: the last messages before a pause must not wait for
        the next message to be flushed."""
        if self.flush_interval is not None and time.monotonic() - self._flushed_at >= self.flush_interval:
            self.flush()

    def close(self) -> None:
        super().close()
        data = _yaml().load(self.metapath.read_text())
        data["rosbag2_bagfile_information"]["ros_distro"] = ros_distro()
        tmp = self.metapath.with_suffix(".yaml.tmp")
        with open(tmp, "w") as f:
            _yaml().dump(data, f)
        tmp.replace(self.metapath)

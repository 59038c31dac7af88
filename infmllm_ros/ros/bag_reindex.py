"""Repair a recording that was killed before it was closed (the `ros2 bag reindex` of this project).

    infmllm-record --reindex BAG [--output OUT]      # or: python -m infmllm_ros.ros.bag_reindex BAG [OUT]

A SIGKILLed recorder leaves no metadata.yaml, and an mcap file without its summary and footer, so no reader
opens it. What it wrote is still there (bag_writer flushes at least every --flush-interval s):
* mcap: the records are scanned from the start; schemas, channels and messages of every complete chunk are kept
  (chunks are all-or-nothing: a CRC or size mismatch is corruption), and the first truncated or corrupt record
  ends the scan, so a torn tail is dropped.
* sqlite3: sqlite's own recovery on open (the WAL's committed transactions; a torn one is discarded).
From that a complete bag is written (every chunk indexed, summary, footer, metadata.yaml with the topics'
offered QoS), in place of BAG or into a new folder OUT; rosbags, ros2 bag and infmllm-replay read it.
"""

from __future__ import annotations

import argparse
import mmap
import shutil
import sqlite3
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

from rosbags.rosbag2.metadata import parse_qos
from rosbags.rosbag2.storage_mcap import decompress

from infmllm_ros.ros import bag

MCAP_MAGIC = b"\x89MCAP0\r\n"
OP_FOOTER, OP_SCHEMA, OP_CHANNEL, OP_MESSAGE, OP_CHUNK, OP_DATA_END = 0x02, 0x03, 0x04, 0x05, 0x06, 0x0F


class _Cut(Exception):
    """Where the readable prefix of a storage file ends, and why."""


def storage_file(path: Path) -> Path:
    """The one .mcap / .db3 file of a bag folder (or the file itself)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise bag.BagError(f"bag not found: {path}")
    files = sorted(list(path.glob("*.mcap")) + list(path.glob("*.db3")))
    if len(files) != 1:
        raise bag.BagError(f"{path} holds {len(files)} .mcap/.db3 files: expected exactly one")
    return files[0]


# ---- mcap: a record-level scan ---------------------------------------------------------------------------------

def _string(buf: bytes, at: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<I", buf, at)
    if at + 4 + n > len(buf):
        raise _Cut("string past the end of its record")
    return buf[at + 4: at + 4 + n].decode(), at + 4 + n


def _records(buf: bytes, at: int, end: int) -> Iterator[tuple[int, bytes, int]]:
    """(opcode, body, offset after it) of each complete record in buf[at:end]; _Cut on a torn one."""
    while at < end:
        if end - at < 9:
            raise _Cut(f"{end - at} bytes of a record header")
        op, length = struct.unpack_from("<BQ", buf, at)
        if at + 9 + length > end:
            raise _Cut(f"record 0x{op:02x} of {length} bytes cut short")
        yield op, buf[at + 9: at + 9 + length], at + 9 + length
        at += 9 + length


class McapScan:
    """Schemas, channels and messages (in file order) of the readable prefix of an mcap file."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:  # mapped, not read: a recording can be larger than memory
            self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
        if len(self.data) < len(MCAP_MAGIC):
            raise bag.BagError(f"{path} holds {len(self.data)} bytes: the recorder was killed before its first "
                               f"flush, there is nothing to recover")
        if self.data[:8] != MCAP_MAGIC:
            raise bag.BagError(f"{path} is not an mcap file (no magic at its start)")
        self.schemas: dict[int, tuple[str, str]] = {}  # id -> (type name, definition text)
        self.good_end = 8  # bytes of the file that are a complete, readable prefix
        self.cut = ""

    def close(self) -> None:
        if isinstance(self.data, mmap.mmap):
            self.data.close()

    def items(self) -> Iterator[tuple]:
        """('channel', id, topic, msgtype, msgdef, encoding, qos) and ('message', channel id, log time, bytes)."""
        try:
            for op, body, after in _records(self.data, 8, len(self.data)):
                if op in (OP_FOOTER, OP_DATA_END):
                    self.good_end = len(self.data)  # a closed file: the summary follows, nothing more to take
                    return
                if op == OP_CHUNK:
                    inner = list(self._chunk(body))  # all or nothing
                    yield from inner
                else:
                    yield from self._record(op, body)
                self.good_end = after
        except _Cut as cut:
            self.cut = str(cut)

    def _chunk(self, body: bytes) -> Iterator[tuple]:
        try:
            _start, _end, size, crc = struct.unpack_from("<QQQI", body, 0)
            compression, at = _string(body, 28)
            (length,) = struct.unpack_from("<Q", body, at)
            records = body[at + 8: at + 8 + length]
            if len(records) != length:
                raise _Cut("chunk data cut short")
            raw = decompress(records, compression, size, crc)
        except (struct.error, _Cut) as exc:
            raise _Cut(f"corrupt chunk: {exc}") from None
        except Exception as exc:  # rosbags ReaderError (size / CRC), zstd / lz4 errors
            raise _Cut(f"corrupt chunk: {bag._reason(exc)}") from None
        for op, inner, _ in _records(raw, 0, len(raw)):
            yield from self._record(op, inner)

    def _record(self, op: int, body: bytes) -> Iterator[tuple]:
        try:
            if op == OP_SCHEMA:
                (sid,) = struct.unpack_from("<H", body, 0)
                name, at = _string(body, 2)
                _encoding, at = _string(body, at)
                (n,) = struct.unpack_from("<I", body, at)
                self.schemas[sid] = (name, body[at + 4: at + 4 + n].decode())
            elif op == OP_CHANNEL:
                cid, sid = struct.unpack_from("<HH", body, 0)
                topic, at = _string(body, 4)
                encoding, at = _string(body, at)
                (n,) = struct.unpack_from("<I", body, at)
                meta, at, end = {}, at + 4, at + 4 + n
                while at < end:
                    key, at = _string(body, at)
                    meta[key], at = _string(body, at)
                msgtype, msgdef = self.schemas.get(sid, ("", ""))
                yield "channel", cid, topic, msgtype, msgdef, encoding, parse_qos(meta.get("offered_qos_profiles"))
            elif op == OP_MESSAGE:
                cid, _seq, log_time, _pub = struct.unpack_from("<HIQQ", body, 0)
                yield "message", cid, log_time, body[22:]
        except (struct.error, UnicodeDecodeError) as exc:
            raise _Cut(f"corrupt record 0x{op:02x}: {exc}") from None


# ---- sqlite3: sqlite's recovery ---------------------------------------------------------------------------------

def _sqlite_items(path: Path) -> Iterator[tuple]:
    conn = sqlite3.connect(path)  # read-write on purpose: this replays the WAL / rolls back a torn transaction
    try:
        defs = dict(conn.execute("SELECT topic_type, encoded_message_definition FROM message_definitions"))
        for cid, topic, msgtype, encoding, qos in conn.execute(
                "SELECT id, name, type, serialization_format, offered_qos_profiles FROM topics ORDER BY id"):
            yield "channel", cid, topic, msgtype, defs.get(msgtype, ""), encoding, parse_qos(qos)
        for cid, t, data in conn.execute("SELECT topic_id, timestamp, data FROM messages ORDER BY id"):
            yield "message", cid, t, data
    except sqlite3.DatabaseError as exc:
        raise bag.BagError(f"cannot read {path}: {exc}") from None
    finally:
        conn.close()


# ---- writing the repaired bag ----------------------------------------------------------------------------------

def _digest(msgtype: str, msgdef: str) -> str:
    """RIHS01 hash of a type: from the installed definition, else from the one stored in the bag."""
    try:
        bag.ensure_type(msgtype)
    except bag.BagError:
        from rosbags.typesys import get_types_from_msg

        bag.typestore().register(get_types_from_msg(msgdef, msgtype))
    return bag.typestore().hash_rihs01(msgtype)


def reindex(path: str | Path, output: str | Path | None = None) -> dict:
    """Write a complete bag from what `path` (a bag folder or its storage file) holds; in place unless `output`.
    Returns {'messages', 'topics', 'dropped_bytes', 'cut', 'output'}."""
    src = storage_file(Path(path))
    folder = Path(output) if output is not None else src.parent
    if output is not None and folder.exists():
        raise bag.BagError(f"output bag {folder} already exists")
    storage = {".mcap": "mcap", ".db3": "sqlite3"}.get(src.suffix)
    if storage is None:
        raise bag.BagError(f"{src} is neither .mcap nor .db3")
    scan = McapScan(src) if storage == "mcap" else None
    items = scan.items() if scan else _sqlite_items(src)
    tmp = folder.parent / f".{folder.name}.reindex" / folder.name
    shutil.rmtree(tmp.parent, ignore_errors=True)
    tmp.parent.mkdir(parents=True)
    writer = bag.open_writer(tmp, storage=storage)
    conns, count = {}, 0
    try:
        for item in items:
            if item[0] == "channel":
                _, cid, topic, msgtype, msgdef, encoding, qos = item
                if cid not in conns and msgtype:
                    conns[cid] = writer.add_connection(topic, msgtype, msgdef=msgdef, rihs01=_digest(msgtype, msgdef),
                                                       serialization_format=encoding, offered_qos_profiles=qos)
            elif item[1] in conns:
                writer.write(conns[item[1]], item[2], item[3])
                count += 1
        writer.close()
        if output is None:  # a stale -wal next to the new .db3 would be replayed into it: remove it first
            for old in src.parent.glob(src.name + "-*"):
                old.unlink()
        folder.mkdir(exist_ok=True)
        new_names = {new.name for new in tmp.iterdir()}
        for name in new_names:
            (tmp / name).replace(folder / name)  # atomic: the old file stays until the new one is complete
        if output is None and src.name not in new_names:
            src.unlink()
    finally:
        if writer.storage is not None:
            writer.abort()
        shutil.rmtree(tmp.parent, ignore_errors=True)
    dropped = len(scan.data) - scan.good_end if scan else 0
    if scan:
        scan.close()
    return {"messages": count, "topics": len(conns), "dropped_bytes": dropped, "cut": scan.cut if scan else "",
            "output": folder}


def report(result: dict) -> str:
    tail = (f"; dropped a torn tail of {result['dropped_bytes']} bytes ({result['cut']})"
            if result["dropped_bytes"] else "")
    return f"reindexed {result['output']}: {result['messages']} messages on {result['topics']} topic(s){tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infmllm_ros.ros.bag_reindex", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bag", help="bag folder (or its .mcap / .db3 file)")
    p.add_argument("output", nargs="?", help="write the repaired bag to this new folder instead of in place")
    args = p.parse_args(argv)
    try:
        print(report(reindex(args.bag, args.output)), file=sys.stderr)
    except bag.BagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""rosbag2 bags through `rosbags`: open, read and write with one-line errors, and message type lookup.

Shared by `infmllm-make-bag`, `infmllm-record`, `infmllm-replay`, the demo and the tests.

    python -m infmllm_ros.ros.bag BAG        # print a short summary of a bag (topics, counts, duration)
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from rosbags.rosbag2 import Reader, StoragePlugin
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from infmllm_ros.ros.bag_writer import DurableWriter

STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
BAG_VERSION = 9

_TYPESTORE = None


class BagError(Exception):
    """A problem with a bag or a message type, worded for the user (printed as one line, no traceback)."""


def typestore():
    """The rosbags typestore for ROS 2 Kilted (built once), extended on demand by `ensure_type`."""
    global _TYPESTORE
    if _TYPESTORE is None:
        _TYPESTORE = get_typestore(Stores.ROS2_KILTED)
    return _TYPESTORE


def ros_type(msgtype: str):
    """The rclpy message class for 'pkg/msg/Name' (also accepts 'pkg/Name'); BagError if it is not installed."""
    parts = msgtype.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or not all(parts):
        raise BagError(f"malformed message type {msgtype!r} (expected pkg/msg/Name)")
    pkg, kind, name = parts
    try:
        module = importlib.import_module(f"{pkg}.{kind}")
        return getattr(module, name)
    except (ImportError, AttributeError):
        raise BagError(f"unknown message type {msgtype!r}: Python package {pkg!r} does not provide {kind}/{name} "
                       f"(install ros-kilted-{pkg.replace('_', '-')})") from None


def normalize_type(msgtype: str) -> str:
    """'pkg/Name' -> 'pkg/msg/Name'; full names pass through."""
    parts = msgtype.split("/")
    return f"{parts[0]}/msg/{parts[1]}" if len(parts) == 2 else msgtype


def _share_dirs() -> list[Path]:
    prefixes = [Path(sys.prefix)] + [Path(p) for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    return [p / "share" for p in prefixes]


def ensure_type(msgtype: str) -> None:
    """Make `msgtype` (and what it depends on) known to the typestore, from installed .msg files if needed."""
    store = typestore()
    msgtype = normalize_type(msgtype)
    if msgtype in store.fielddefs:
        return
    pending, found = [msgtype], {}
    while pending:
        name = pending.pop()
        if name in found or name in store.fielddefs:
            continue
        pkg, _, leaf = name.split("/")
        files = [d / pkg / "msg" / f"{leaf}.msg" for d in _share_dirs()]
        text = next((f.read_text() for f in files if f.is_file()), None)
        if text is None:
            raise BagError(f"unknown message type {name!r}: not in the ROS 2 Kilted type store and no {pkg}/msg/"
                           f"{leaf}.msg under {', '.join(str(d) for d in _share_dirs())}")
        types = get_types_from_msg(text, name)
        found.update(types)
        for _, fields in types.values():
            for _, (kind, spec) in fields:
                if kind.name != "NAME" and isinstance(spec, tuple) and isinstance(spec[0], tuple):
                    kind, spec = spec[0]  # array or sequence: look at the element type
                if kind.name == "NAME":
                    pending.append(normalize_type(spec))
    store.register(found)


def open_writer(path: str | Path, storage: str = "mcap", overwrite: bool = False,
                flush_interval: float | None = None, flush_messages: int | None = None) -> DurableWriter:
    """An opened writer for a new bag directory (rosbag2 version 9); with `flush_interval` (seconds) and / or
    `flush_messages`, what was written survives a SIGKILL once that much time or that many messages have passed
    (see bag_writer)."""
    path = Path(path)
    if storage not in STORAGES:
        raise BagError(f"unknown storage {storage!r} (choose from {', '.join(STORAGES)})")
    if path.exists():
        if not overwrite:
            raise BagError(f"output bag {path} already exists (use --overwrite to replace it)")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if not path.parent.exists():
        raise BagError(f"output folder {path.parent} does not exist")
    writer = DurableWriter(path, version=BAG_VERSION, storage_plugin=STORAGES[storage], flush_interval=flush_interval,
                           flush_messages=flush_messages)
    writer.open()
    return writer


def add_connection(writer: DurableWriter, topic: str, msgtype: str, qos=()):
    """Register a topic on an open writer, with its message definition from the type store."""
    msgtype = normalize_type(msgtype)
    ensure_type(msgtype)
    return writer.add_connection(topic, msgtype, typestore=typestore(), offered_qos_profiles=list(qos))


def open_reader(path: str | Path) -> Reader:
    """An opened rosbags Reader (bag folder, or a single .mcap / .db3 file); BagError with the reason otherwise."""
    path = Path(path)
    if not path.exists():
        raise BagError(f"bag not found: {path}")
    if path.is_dir() and not (path / "metadata.yaml").exists():
        files = sorted(list(path.glob("*.mcap")) + list(path.glob("*.db3")))
        hint = (f" (a killed recording? repair it with `infmllm-record --reindex {path}`); a closed one reads "
                f"without metadata when given the storage file itself: {files[0]}" if files else "")
        raise BagError(f"not a rosbag2 bag: {path} has no metadata.yaml{hint}")
    try:
        reader = Reader(path)
        reader.open()
    except Exception as exc:  # rosbags raises ReaderError, FileNotFoundError, YAML, sqlite3 and struct errors
        hint = ""
        if "magic" in str(exc).lower():  # an mcap without its footer: killed, or cut short
            hint = f" (a recording that was not closed? repair it with `infmllm-record --reindex {path}`)"
        raise BagError(f"cannot open bag {path}: {_reason(exc)}{hint}") from None
    return reader


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def iter_messages(reader: Reader, connections: Iterable = (), start: int | None = None) -> Iterator[tuple]:
    """(connection, log time ns, raw CDR bytes) in time order; a corrupt storage file ends in BagError."""
    count = 0
    try:
        for item in reader.messages(connections=list(connections), start=start):
            count += 1
            yield item
    except BagError:
        raise
    except Exception as exc:
        raise BagError(f"bag {reader.path} is corrupt after {count} readable messages: {_reason(exc)}") from None


def deserialize(raw: bytes, msgtype: str):
    """Deserialize CDR bytes to a rosbags message object (fields compare with ==, arrays are numpy)."""
    ensure_type(msgtype)
    return typestore().deserialize_cdr(raw, normalize_type(msgtype))


def serialize(msg, msgtype: str) -> bytes:
    return bytes(typestore().serialize_cdr(msg, normalize_type(msgtype)))


def read_all(path: str | Path) -> list[tuple[str, str, int, object]]:
    """Every message of a bag as (topic, msgtype, log time ns, deserialized message); for tests and tools."""
    reader = open_reader(path)
    try:
        return [(c.topic, c.msgtype, t, deserialize(raw, c.msgtype)) for c, t, raw in iter_messages(reader)]
    finally:
        reader.close()


IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")


def stream(path: str | Path, image_topic: str | None = None, instruction_topic: str | None = None) -> Iterator[tuple]:
    """A camera + instruction bag as ('frame', stamp_s, rgb HxWx3 uint8) and ('instruction', log time s, text),
    in bag order, without ROS: what a demo or benchmark feeds a StreamingSession. Topics default to the only
    image topic and the only std_msgs/String topic of the bag. rgb8/bgr8/mono8 raw images and JPEG/PNG
    compressed images are decoded."""
    reader = open_reader(path)
    try:
        image_topic = image_topic or _only(reader, IMAGE_TYPES, "image")
        instruction_topic = instruction_topic or _only(reader, ("std_msgs/msg/String",), "instruction")
        conns = [c for c in reader.connections if c.topic in (image_topic, instruction_topic)]
        for conn, t_ns, raw in iter_messages(reader, conns):
            msg = deserialize(raw, conn.msgtype)
            if conn.topic == instruction_topic:
                yield "instruction", t_ns / 1e9, msg.data
            else:
                yield "frame", msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9, to_rgb(msg)
    finally:
        reader.close()


def _only(reader, msgtypes, what: str) -> str | None:
    topics = sorted({c.topic for c in reader.connections if c.msgtype in msgtypes})
    if len(topics) > 1:
        raise BagError(f"bag has several {what} topics {topics}: choose one")
    return topics[0] if topics else None


def to_rgb(msg):
    """rosbags Image / CompressedImage -> RGB uint8 (H, W, 3) numpy array."""
    import numpy as np

    if hasattr(msg, "format"):  # CompressedImage
        import io

        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(bytes(msg.data))).convert("RGB"))
    channels = {"rgb8": 3, "bgr8": 3, "mono8": 1}.get(msg.encoding)
    if channels is None:
        raise BagError(f"image encoding {msg.encoding!r} not supported here (rgb8, bgr8, mono8)")
    rows = np.asarray(msg.data, np.uint8).reshape(msg.height, msg.step)
    img = rows[:, : msg.width * channels].reshape(msg.height, msg.width, channels)
    if msg.encoding == "bgr8":
        img = img[:, :, ::-1]
    elif channels == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img)


def bag_size(path: str | Path) -> int:
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def summary(path: str | Path) -> str:
    reader = open_reader(path)
    try:
        lines = [f"bag: {path}", f"size: {bag_size(path) / 1e6:.2f} MB",
                 f"duration: {reader.duration / 1e9:.3f} s", f"start: {reader.start_time / 1e9:.9f}",
                 f"messages: {reader.message_count}"]
        for conn in reader.connections:
            lines.append(f"  {conn.topic}  {conn.msgtype}  {conn.msgcount} msgs")
        return "\n".join(lines)
    finally:
        reader.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infmllm_ros.ros.bag", description="Print a summary of a bag.")
    parser.add_argument("bag", help="bag folder, or a single .mcap / .db3 file")
    args = parser.parse_args(argv)
    try:
        print(summary(args.bag))
    except BagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

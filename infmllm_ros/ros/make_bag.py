"""infmllm-make-bag: a video file or a folder of images plus an instruction script -> a rosbag2 bag.

Frames become sensor_msgs/Image (rgb8) or, with --compressed, sensor_msgs/CompressedImage (jpeg); the script's
lines become std_msgs/String instructions. Frame i is stamped start + i / fps (header stamp and bag log time);
instruction k at start + t_k.

Script (YAML), times in seconds from the first frame:
    - {t: 1.05, say: "What is in front of the robot?"}
    - {t: 2.55, say: "How many people are walking?"}
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from infmllm_ros.ros import bag, media

DEFAULT_START = 1_700_000_000.0  # fixed so two bags made from the same input are identical


def load_script(path: str | Path | None, inline: list[str] | None = None) -> list[tuple[float, str]]:
    """[(t seconds, text)] sorted by t, from a YAML list of {t, say} and/or 'T:TEXT' strings."""
    items: list[tuple[float, str]] = []
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise bag.BagError(f"cannot read script {path}: {str(exc).splitlines()[0]}") from None
        if data is None:
            data = []
        if not isinstance(data, list):
            raise bag.BagError(f"script {path}: expected a YAML list of {{t: seconds, say: text}}")
        for n, entry in enumerate(data, 1):
            if not isinstance(entry, dict) or "t" not in entry or "say" not in entry:
                raise bag.BagError(f"script {path}, entry {n}: expected {{t: seconds, say: text}}, got {entry!r}")
            items.append((_time(entry["t"], f"script {path}, entry {n}"), str(entry["say"])))
    for text in inline or []:
        t, sep, say = text.partition(":")
        if not sep:
            raise bag.BagError(f"--say {text!r}: expected T:TEXT, e.g. 1.5:what do you see?")
        items.append((_time(t, f"--say {text!r}"), say))
    return sorted(items, key=lambda item: item[0])


def _time(value, where: str) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise bag.BagError(f"{where}: t must be a number of seconds, got {value!r}") from None
    if t < 0:
        raise bag.BagError(f"{where}: t must be >= 0, got {t}")
    return t


def _stamp(seconds: float):
    ns = round(seconds * 1e9)
    return ns, bag.typestore().types["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)


def image_message(rgb, stamp, frame_id: str, compressed: bool = False, quality: int = 90):
    """(msgtype, message) for one RGB uint8 frame."""
    types = bag.typestore().types
    header = types["std_msgs/msg/Header"](stamp=stamp, frame_id=frame_id)
    if compressed:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
        data = np.frombuffer(buf.getvalue(), np.uint8)
        return "sensor_msgs/msg/CompressedImage", types["sensor_msgs/msg/CompressedImage"](
            header=header, format="jpeg", data=data)
    h, w, _ = rgb.shape
    return "sensor_msgs/msg/Image", types["sensor_msgs/msg/Image"](
        header=header, height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3, data=rgb.reshape(-1))


def make_bag(source, out, script=(), *, fps=None, start=DEFAULT_START, max_frames=None, size=None,
             compressed=False, quality=90, frame_id="camera", image_topic="/image",
             instruction_topic="/instruction", storage="mcap", overwrite=False) -> dict:
    """Write the bag; returns counts and sizes. `script` is [(t, text)]."""
    source = Path(source)
    if fps is None:
        fps = (media.video_fps(source) if source.is_file() else 0.0) or 10.0
    if fps <= 0:
        raise bag.BagError(f"--fps must be positive, got {fps}")
    frames = media.iter_frames(source, fps=fps, max_frames=max_frames, size=size)
    first = next(frames, None)  # read one frame before creating the output, so bad input leaves nothing behind
    if first is None:
        raise bag.BagError(f"no frames in {source}")
    writer = bag.open_writer(out, storage=storage, overwrite=overwrite)
    n_frames = n_said = 0
    try:
        string_cls = bag.typestore().types["std_msgs/msg/String"]
        conns = {}
        pending = list(script)

        def write(topic, msgtype, msg, ns):
            if topic not in conns:
                conns[topic] = bag.add_connection(writer, topic, msgtype)
            writer.write(conns[topic], ns, bag.serialize(msg, msgtype))

        def flush_instructions(until: float | None):
            nonlocal n_said
            while pending and (until is None or pending[0][0] < until):
                t, text = pending.pop(0)
                ns, _ = _stamp(start + t)
                write(instruction_topic, "std_msgs/msg/String", string_cls(data=text), ns)
                n_said += 1

        for index, rgb in enumerate(_chain(first, frames)):
            t = index / fps
            flush_instructions(t)  # instructions strictly before this frame; one at the same time comes after it
            ns, stamp = _stamp(start + t)
            msgtype, msg = image_message(rgb, stamp, frame_id, compressed, quality)
            write(image_topic, msgtype, msg, ns)
            n_frames += 1
        flush_instructions(None)
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            writer.close()
        shutil.rmtree(out, ignore_errors=True)  # no half-written bag left behind
        raise
    writer.close()
    return {"frames": n_frames, "instructions": n_said, "fps": fps, "bytes": bag.bag_size(out),
            "duration_s": max((n_frames - 1) / fps, max((t for t, _ in script), default=0.0))}


def _chain(first, rest):
    yield first
    yield from rest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infmllm-make-bag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: infmllm-make-bag data/opencv-doc/vtest.avi out/vtest --script say.yaml "
               "--resize 192x144 --fps 5 --max-frames 40\n"
               "after colcon build (tools are not on PATH): ros2 run infmllm_ros infmllm-make-bag ...")
    p.add_argument("source", help="video file (needs PyAV) or folder of images (sorted by name)")
    p.add_argument("out", help="output bag folder (must not exist unless --overwrite)")
    p.add_argument("--script", help="YAML list of {t: seconds, say: text} instructions")
    p.add_argument("--say", action="append", metavar="T:TEXT", help="one instruction at T seconds (repeatable)")
    p.add_argument("--fps", type=float, help="frame rate of the bag (default: the video's, or 10 for images); "
                                             "below a video's rate frames are dropped evenly")
    p.add_argument("--start", type=float, default=DEFAULT_START,
                   help=f"stamp of the first frame, seconds since the epoch (default {DEFAULT_START:.0f})")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    p.add_argument("--resize", metavar="WxH", help="resize frames, e.g. 320x240")
    p.add_argument("--compressed", action="store_true", help="write sensor_msgs/CompressedImage (jpeg)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality with --compressed (default 90)")
    p.add_argument("--frame-id", default="camera", help="header.frame_id of the frames (default camera)")
    p.add_argument("--image-topic", default="/image", help="default /image")
    p.add_argument("--instruction-topic", default="/instruction", help="default /instruction")
    p.add_argument("--storage", choices=sorted(bag.STORAGES), default="mcap", help="default mcap")
    p.add_argument("--overwrite", action="store_true", help="replace the output bag if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.max_frames is not None and args.max_frames <= 0:
            raise bag.BagError("--max-frames must be positive")
        script = load_script(args.script, args.say)
        info = make_bag(args.source, args.out, script, fps=args.fps, start=args.start, max_frames=args.max_frames,
                        size=media.parse_size(args.resize), compressed=args.compressed, quality=args.jpeg_quality,
                        frame_id=args.frame_id, image_topic=args.image_topic,
                        instruction_topic=args.instruction_topic, storage=args.storage, overwrite=args.overwrite)
    except (bag.BagError, media.MediaError) as exc:
        print(f"infmllm-make-bag: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, sqlite3.Error) as exc:  # disk full, permissions: the partial bag was removed
        print(f"infmllm-make-bag: error: writing {args.out} failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("infmllm-make-bag: interrupted", file=sys.stderr)
        return 130
    print(f"wrote {args.out}: {info['frames']} frames at {info['fps']:g} fps, {info['instructions']} instructions, "
          f"{info['duration_s']:.2f} s, {info['bytes'] / 1e6:.2f} MB in {time.perf_counter() - t0:.2f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Real media for bags, demos and tests: fetch vtest.avi from Debian's opencv-doc, read video or image folders.

vtest.avi (768x576, 10 fps, 795 frames of pedestrians; OpenCV sample data, Apache-2.0 AND BSD-3-Clause as stated
by the Debian package's copyright file) is fetched once with `apt-get download opencv-doc` and only that file is
extracted from the .deb into `data/opencv-doc/` at the repository root (git-ignored). Set INFMLLM_VTEST to use a
copy that is already on disk.

    python -m infmllm_ros.ros.media            # fetch (if missing) and print the path of vtest.avi
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "data" / "opencv-doc"
DEB_PACKAGE = "opencv-doc"
DEB_DATA = "./usr/share/doc/opencv-doc/examples/data/"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


class MediaError(Exception):
    """Media that cannot be fetched or read, worded for the user."""


def fetch_debian_file(name: str, dest_dir: Path = DATA_DIR, package: str = DEB_PACKAGE) -> Path:
    """`dest_dir/name`, extracted from the Debian package's examples/data folder if it is not there yet."""
    target = Path(dest_dir) / name
    if target.is_file() and target.stat().st_size > 0:
        return target
    for tool in ("apt-get", "dpkg-deb", "tar"):
        if shutil.which(tool) is None:
            raise MediaError(f"cannot fetch {name}: {tool} not found (Debian/Ubuntu only); set INFMLLM_VTEST "
                             f"or put the file at {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="infmllm-media-") as tmp:
        deb = _apt_download(package, Path(tmp))
        out = Path(tmp) / "x"
        out.mkdir()
        members = [DEB_DATA + name, "./usr/share/doc/opencv-doc/copyright"]
        cmd = f"dpkg-deb --fsys-tarfile '{deb}' | tar -x -C '{out}' {' '.join(repr(m) for m in members)}"
        done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)
        extracted = out / DEB_DATA / name
        if done.returncode != 0 or not extracted.is_file():
            raise MediaError(f"cannot extract {name} from {deb.name}: {done.stderr.strip() or 'not in package'}")
        shutil.copyfile(out / "usr/share/doc/opencv-doc/copyright", target.parent / "copyright")
        partial = target.with_suffix(target.suffix + ".part")
        shutil.copyfile(extracted, partial)
        partial.replace(target)  # atomic: a concurrent reader never sees half a file
    return target


def _apt_download(package: str, where: Path) -> Path:
    def download():
        return subprocess.run(["apt-get", "download", package], cwd=where, capture_output=True, text=True)

    done = download()
    if done.returncode != 0 and os.geteuid() == 0:  # package lists may be missing on a fresh image
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        done = download()
    debs = sorted(where.glob(f"{package}_*.deb"))
    if done.returncode != 0 or not debs:
        last = (done.stderr.strip().splitlines() or ["no .deb downloaded"])[-1]
        raise MediaError(f"apt-get download {package} failed: {last}")
    return debs[0]


def vtest_path() -> Path:
    """Path of vtest.avi: $INFMLLM_VTEST if set, else data/opencv-doc/vtest.avi, fetched if missing."""
    env = os.environ.get("INFMLLM_VTEST")
    if env:
        if not Path(env).is_file():
            raise MediaError(f"INFMLLM_VTEST={env} is not a file")
        return Path(env)
    return fetch_debian_file("vtest.avi")


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'WxH' -> (W, H)."""
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise MediaError(f"bad size {text!r}: expected WxH, e.g. 320x240") from None
    if w <= 0 or h <= 0:
        raise MediaError(f"bad size {text!r}: width and height must be positive")
    return w, h


def video_fps(path: str | Path) -> float:
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            rate = container.streams.video[0].average_rate
    except Exception as exc:
        raise MediaError(f"cannot read video {path}: {exc}") from None
    return float(rate) if rate else 0.0


def iter_frames(source: str | Path, fps: float | None = None, max_frames: int | None = None,
                size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """RGB uint8 frames (H, W, 3) of a video file or of the images in a folder (sorted by name).

    For a video, `fps` below the native rate keeps one frame per 1/fps of video time (frames are dropped, never
    duplicated); above it is an error. For a folder every image is a frame. `size` = (W, H) resizes.
    """
    source = Path(source)
    if not source.exists():
        raise MediaError(f"input not found: {source}")
    frames = _iter_images(source, size) if source.is_dir() else _iter_video(source, fps, size)
    for i, frame in enumerate(frames):
        if max_frames is not None and i >= max_frames:
            return
        yield frame


def _iter_images(folder: Path, size) -> Iterator[np.ndarray]:
    from PIL import Image

    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MediaError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    for f in files:
        try:
            img = Image.open(f).convert("RGB")
        except Exception as exc:
            raise MediaError(f"cannot read image {f}: {exc}") from None
        if size and img.size != size:
            img = img.resize(size, Image.BILINEAR)
        yield np.asarray(img, dtype=np.uint8)


def _import_av():
    try:
        import av
    except ImportError:
        raise MediaError("reading video needs PyAV: pip install av (or pass a folder of images)") from None
    return av


def _iter_video(path: Path, fps: float | None, size) -> Iterator[np.ndarray]:
    av = _import_av()
    try:
        container = av.open(str(path))
    except Exception as exc:
        raise MediaError(f"cannot open video {path}: {exc}") from None
    with container:
        if not container.streams.video:
            raise MediaError(f"no video stream in {path}")
        stream = container.streams.video[0]
        native = float(stream.average_rate or 0) or None
        if fps and native and fps > native + 1e-6:
            raise MediaError(f"--fps {fps:g} is above the video's {native:g} fps (frames are never duplicated)")
        step = Fraction(1) / Fraction(fps).limit_denominator(1000) if fps and native and fps < native else None
        next_t = Fraction(0)
        try:
            for index, frame in enumerate(container.decode(stream)):
                if step is not None:
                    t = Fraction(frame.pts * stream.time_base) if frame.pts is not None else Fraction(index) / Fraction(
                        native).limit_denominator(1000)
                    if t + Fraction(1, 10**6) < next_t:
                        continue
                    next_t += step
                if size:
                    frame = frame.reformat(width=size[0], height=size[1], format="rgb24")
                yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as exc:
            raise MediaError(f"cannot decode video {path}: {exc}") from None


if __name__ == "__main__":
    try:
        print(vtest_path())
    except MediaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)

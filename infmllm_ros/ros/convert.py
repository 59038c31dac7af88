"""sensor_msgs/Image and CompressedImage <-> numpy, with cv_bridge's encoding names and semantics.

cv_bridge is not a pip package, so this is a small, self-contained reimplementation of the parts the node needs:

* :func:`imgmsg_to_numpy` is ``CvBridge().imgmsg_to_cv2(msg, "passthrough")``: the pixels in the message's own
  layout (``uint8``/``uint16``, HxW or HxWxC), native byte order, ``step`` (row padding) honoured.
* :func:`imgmsg_to_rgb` is ``imgmsg_to_cv2(msg, "rgb8")``: HxWx3 ``uint8`` RGB. Colour order, alpha dropping,
  16 -> 8 bit scaling (``round(v * 255 / 65535)``, as cv_bridge's ``convertTo``) and YUV 4:2:2 decoding
  (OpenCV's fixed-point BT.601 "video range" formula) match cv_bridge. ``yuv422`` is **UYVY** (U0 Y0 V0 Y1)
  and ``yuv422_yuy2`` is **YUYV** (Y0 U0 Y1 V0), exactly as cv_bridge maps them to ``COLOR_YUV2RGB_UYVY`` /
  ``COLOR_YUV2RGB_YUY2``. Extensions: ``16UC1`` and ``8UC1`` are shown as grey (cv_bridge refuses a colour
  conversion of non-colour encodings; a depth camera on the ``image`` topic is still something to look at).
* :func:`compressed_to_rgb` decodes JPEG/PNG ``CompressedImage`` data with Pillow (cv_bridge uses
  ``cv2.imdecode``); 16-bit PNG is scaled to 8 bit like ``mono16``.
* :func:`numpy_to_imgmsg` / :func:`rgb_to_compressed` go the other way, with ``.tobytes()`` (assigning a
  numpy array to ``Image.data`` is ~100x slower in rclpy).

Zero-copy: whenever the RGB result can be expressed as a view of the message buffer (``rgb8``, ``bgr8``,
``rgba8``, ``bgra8``, ``mono8`` broadcast, any padded ``step``), it is one; the returned array is then
read-only and may be non-contiguous (negative or zero strides). Call ``np.ascontiguousarray`` on the frames
you actually use (the node does that in its worker thread, so dropped frames never cost a copy).

Every malformed input raises :class:`ImageConversionError` (a ``ValueError``) with a message that says what is
wrong and what was expected. Message objects are duck-typed (``height``, ``width``, ``encoding``, ``step``,
``is_bigendian``, ``data``; ``format`` and ``data`` for compressed), so rosbags messages work as well.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ENCODINGS",
    "ImageConversionError",
    "compressed_to_rgb",
    "imgmsg_to_numpy",
    "imgmsg_to_rgb",
    "numpy_to_imgmsg",
    "rgb_to_compressed",
    "to_rgb",
]

# Largest frame accepted (pixels). A 4K frame is 8.3 Mpx; anything above 64 Mpx on a robot's image topic is an
# error (or an attack on memory), not a camera.
MAX_PIXELS_DEFAULT = 64 * 1024 * 1024


class ImageConversionError(ValueError):
    """A message that cannot be turned into an image; the message says why."""


@dataclass(frozen=True)
class _Enc:
    dtype: str  # numpy base dtype ('u1', 'u2')
    channels: int
    order: str  # 'rgb', 'bgr', 'rgba', 'bgra', 'mono', 'uyvy', 'yuyv'


# cv_bridge / sensor_msgs image_encodings names.
ENCODINGS: dict[str, _Enc] = {
    "rgb8": _Enc("u1", 3, "rgb"),
    "bgr8": _Enc("u1", 3, "bgr"),
    "rgba8": _Enc("u1", 4, "rgba"),
    "bgra8": _Enc("u1", 4, "bgra"),
    "mono8": _Enc("u1", 1, "mono"),
    "8UC1": _Enc("u1", 1, "mono"),
    "rgb16": _Enc("u2", 3, "rgb"),
    "bgr16": _Enc("u2", 3, "bgr"),
    "rgba16": _Enc("u2", 4, "rgba"),
    "bgra16": _Enc("u2", 4, "bgra"),
    "mono16": _Enc("u2", 1, "mono"),
    "16UC1": _Enc("u2", 1, "mono"),
    "yuv422": _Enc("u1", 2, "uyvy"),  # UYVY, as cv_bridge
    "uyvy": _Enc("u1", 2, "uyvy"),  # newer image_encodings alias of yuv422
    "yuv422_yuy2": _Enc("u1", 2, "yuyv"),  # YUYV, as cv_bridge
    "yuyv": _Enc("u1", 2, "yuyv"),  # newer image_encodings alias of yuv422_yuy2
}


def _msg_bytes(data) -> memoryview:
    """A read-only byte view of a message's data field, without copying where the type allows it."""
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).view(np.uint8).reshape(-1)).toreadonly()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data).cast("B").toreadonly()
    try:  # array.array('B') (rclpy), anything else with the buffer protocol
        return memoryview(data).cast("B").toreadonly()
    except TypeError:
        pass
    try:  # a list of ints (old rclpy / hand-built messages)
        return memoryview(bytes(data)).toreadonly()
    except (TypeError, ValueError) as e:
        raise ImageConversionError(f"image data is not a byte buffer ({type(data).__name__}): {e}") from None


def _encoding_of(msg) -> tuple[str, _Enc]:
    enc = msg.encoding
    if not isinstance(enc, str):
        raise ImageConversionError(f"encoding must be a string, got {type(enc).__name__}")
    spec = ENCODINGS.get(enc) or ENCODINGS.get(enc.strip())
    if spec is None:
        raise ImageConversionError(
            f"unknown or unsupported image encoding {enc[:40]!r}; supported: {', '.join(sorted(ENCODINGS))}"
        )
    return enc.strip(), spec


def imgmsg_to_numpy(msg, max_pixels: int = MAX_PIXELS_DEFAULT) -> np.ndarray:
    """cv_bridge ``imgmsg_to_cv2(msg, "passthrough")``: HxW (1 channel) or HxWxC, native byte order.

    A view of the message buffer when the message is in native byte order (rows may be padded: the view's row
    stride is ``step``); a byte-swapped copy otherwise.
    """
    enc_name, enc = _encoding_of(msg)
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ImageConversionError(f"zero-size image: height={h} width={w} ({enc_name})")
    if h * w > max_pixels:
        raise ImageConversionError(f"image too large: {w}x{h} = {h * w} px > max_pixels={max_pixels}")
    itemsize = np.dtype(enc.dtype).itemsize
    row_bytes = w * enc.channels * itemsize
    if enc.order in ("uyvy", "yuyv") and w % 2:
        raise ImageConversionError(f"{enc_name} needs an even width (2 pixels share U and V), got width={w}")
    if step < row_bytes:
        raise ImageConversionError(
            f"step {step} is smaller than width*channels*bytes = {w}*{enc.channels}*{itemsize} = {row_bytes} "
            f"for {enc_name}"
        )
    buf = _msg_bytes(msg.data)
    need = h * step
    if len(buf) < need:
        raise ImageConversionError(
            f"data too short: {len(buf)} bytes < height*step = {h}*{step} = {need} ({enc_name} {w}x{h})"
        )
    big = bool(msg.is_bigendian)
    dt = np.dtype(enc.dtype).newbyteorder(">" if big else "<")
    shape = (h, w) if enc.channels == 1 else (h, w, enc.channels)
    strides = (step, enc.channels * itemsize) if enc.channels == 1 else (step, enc.channels * itemsize, itemsize)
    arr = np.ndarray(shape=shape, dtype=dt, buffer=buf, offset=0, strides=strides)
    if itemsize > 1 and big != (sys.byteorder == "big"):
        arr = arr.astype(dt.newbyteorder("="))  # byte-swapped copy in native order (as cv_bridge's byteswap())
    return arr


def _scale16to8(a: np.ndarray) -> np.ndarray:
    # cv_bridge: convertTo(CV_8U, 255/65535) -> round to nearest; v*255/65535 = v/257 never lands on .5.
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _yuv422_to_rgb(a: np.ndarray, order: str) -> np.ndarray:
    """OpenCV's COLOR_YUV2RGB_UYVY / _YUY2, bit-exact (ITU-R BT.601, video range, 20-bit fixed point)."""
    h, w = a.shape[:2]
    pairs = a.reshape(h, w // 2, 4)  # the view keeps the row stride
    if order == "uyvy":
        u, y0, v, y1 = (pairs[..., i].astype(np.int32) for i in range(4))
    else:  # yuyv
        y0, u, y1, v = (pairs[..., i].astype(np.int32) for i in range(4))
    cy, cub, cug, cvg, cvr, shift = 1220542, 2116026, -409993, -852492, 1673527, 20
    half = 1 << (shift - 1)
    uu, vv = u - 128, v - 128
    ruv = half + cvr * vv
    guv = half + cvg * vv + cug * uu
    buv = half + cub * uu
    out = np.empty((h, w // 2, 2, 3), np.uint8)
    for k, yy in enumerate((y0, y1)):
        ys = np.maximum(yy - 16, 0) * cy
        for c, cuv in enumerate((ruv, guv, buv)):
            out[:, :, k, c] = np.clip((ys + cuv) >> shift, 0, 255)
    return out.reshape(h, w, 3)


def to_rgb(arr: np.ndarray, encoding: str) -> np.ndarray:
    """Turn a passthrough array (as from :func:`imgmsg_to_numpy`) of ``encoding`` into HxWx3 uint8 RGB."""
    enc = ENCODINGS.get(encoding)
    if enc is None:
        raise ImageConversionError(f"unknown or unsupported image encoding {encoding[:40]!r}")
    if enc.order in ("uyvy", "yuyv"):
        return _yuv422_to_rgb(arr, enc.order)
    if enc.dtype == "u2":
        arr = _scale16to8(arr)
    if enc.order == "mono":
        return np.broadcast_to(arr[:, :, None], (*arr.shape[:2], 3))
    if enc.order in ("rgb", "rgba"):
        return arr[:, :, :3]
    return arr[:, :, 2::-1]  # bgr / bgra -> rgb (a view with a negative channel stride)


def imgmsg_to_rgb(msg, max_pixels: int = MAX_PIXELS_DEFAULT) -> np.ndarray:
    """sensor_msgs/Image -> HxWx3 uint8 RGB (cv_bridge ``imgmsg_to_cv2(msg, "rgb8")``); a view where possible."""
    arr = imgmsg_to_numpy(msg, max_pixels=max_pixels)
    return to_rgb(arr, msg.encoding.strip())


class _DeadlineReader(io.BytesIO):
    """Pillow reads compressed data block by block while decoding: each read checks the time bound."""

    def __init__(self, buf, deadline: float | None):
        super().__init__(buf)
        self.deadline = deadline

    def read(self, n=-1):
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise ImageConversionError("decoding exceeded its time bound (max_decode_s)")
        return super().read(n)


def compressed_to_rgb(msg, max_pixels: int = MAX_PIXELS_DEFAULT, max_decode_s: float | None = None) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG or PNG) -> HxWx3 uint8 RGB, decoded with Pillow; with ``max_decode_s``,
    decoding stops (ImageConversionError) once it took longer than that (checked every 4 kB of input)."""
    from PIL import Image as PILImage

    fmt = msg.format if isinstance(msg.format, str) else ""
    low = fmt.lower()
    if "compresseddepth" in low:
        raise ImageConversionError(f"compressedDepth images are not supported (format {fmt[:60]!r})")
    buf = _msg_bytes(msg.data)
    if len(buf) == 0:
        raise ImageConversionError(f"empty CompressedImage data (format {fmt[:60]!r})")
    if buf[:2] == b"\xff\xd8":
        kind = "JPEG"
    elif buf[:8] == b"\x89PNG\r\n\x1a\n":
        kind = "PNG"
    else:
        raise ImageConversionError(
            f"CompressedImage data is neither JPEG nor PNG (format {fmt[:60]!r}, first bytes {bytes(buf[:8])!r})"
        )
    try:
        deadline = None if max_decode_s is None else time.monotonic() + max_decode_s
        with PILImage.open(_DeadlineReader(buf, deadline), formats=[kind]) as im:
            im.decodermaxblock = 4096  # small blocks: the time bound is checked between them
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ImageConversionError(f"zero-size {kind} image: {w}x{h}")
            if w * h > max_pixels:  # checked from the header, before decoding
                raise ImageConversionError(f"{kind} image too large: {w}x{h} > max_pixels={max_pixels}")
            im.load()  # raises on truncated or corrupt data (LOAD_TRUNCATED_IMAGES stays False)
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im)
                a16 = np.clip(a, 0, 65535).astype(np.uint16) if a.dtype != np.uint16 else a
                g = _scale16to8(a16)
                return np.ascontiguousarray(np.broadcast_to(g[:, :, None], (*g.shape, 3)))
            if mode != "RGB":
                im = im.convert("RGB")  # L, LA, P, RGBA, CMYK, YCbCr ... (alpha dropped as cv_bridge's rgb8)
            out = np.asarray(im)
    except ImageConversionError:
        raise
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as e:
        raise ImageConversionError(f"corrupt or truncated {kind} data ({len(buf)} bytes): {e}") from None
    if out.ndim != 3 or out.shape[2] != 3 or out.dtype != np.uint8:
        raise ImageConversionError(f"decoded {kind} has unexpected shape {out.shape} / dtype {out.dtype}")
    return out


def numpy_to_imgmsg(arr: np.ndarray, encoding: str = "rgb8", header=None):
    """numpy -> sensor_msgs/Image (cv_bridge ``cv2_to_imgmsg``): dense rows, native byte order, ``.tobytes()``."""
    from sensor_msgs.msg import Image

    enc = ENCODINGS.get(encoding)
    if enc is None:
        raise ImageConversionError(f"unknown or unsupported image encoding {encoding!r}")
    a = np.asarray(arr)
    if a.dtype != np.dtype(enc.dtype):
        raise ImageConversionError(f"{encoding} needs dtype {np.dtype(enc.dtype)}, got {a.dtype}")
    if enc.channels == 1 and a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    want_ndim = 2 if enc.channels == 1 else 3
    if a.ndim != want_ndim or (enc.channels > 1 and a.shape[2] != enc.channels):
        raise ImageConversionError(f"{encoding} needs shape (H, W{'' if enc.channels == 1 else f', {enc.channels}'})"
                                   f", got {a.shape}")
    h, w = a.shape[:2]
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width, msg.encoding = h, w, encoding
    msg.is_bigendian = 1 if sys.byteorder == "big" else 0
    msg.step = w * enc.channels * a.dtype.itemsize
    msg.data = np.ascontiguousarray(a).tobytes()
    return msg


def rgb_to_compressed(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90, header=None):
    """HxWx3 uint8 RGB -> sensor_msgs/CompressedImage (``jpeg`` or ``png``), like image_transport's compressed."""
    from PIL import Image as PILImage
    from sensor_msgs.msg import CompressedImage

    a = np.ascontiguousarray(rgb, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ImageConversionError(f"expected HxWx3 uint8 RGB, got {a.shape}")
    bio = io.BytesIO()
    kind = fmt.lower()
    if kind in ("jpeg", "jpg"):
        PILImage.fromarray(a, "RGB").save(bio, format="JPEG", quality=quality)
        kind = "jpeg"
    elif kind == "png":
        PILImage.fromarray(a, "RGB").save(bio, format="PNG")
    else:
        raise ImageConversionError(f"unsupported compressed format {fmt!r} (jpeg or png)")
    msg = CompressedImage()
    if header is not None:
        msg.header = header
    msg.format = kind
    msg.data = bio.getvalue()
    return msg

"""Image conversion against hand-built numpy oracles (every encoding, padded step, both byte orders),
error messages for malformed messages, compressed images, numpy -> Image, and cv_bridge / OpenCV where present."""

from __future__ import annotations

import io
import sys
import types

import numpy as np
import pytest
from PIL import Image as PILImage

from infmllm_ros.ros import convert as C

H, W = 5, 6
RGB = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)


def msg(arr_bytes: bytes, h=H, w=W, encoding="rgb8", step=None, big=0):
    return types.SimpleNamespace(height=h, width=w, encoding=encoding, step=step, is_bigendian=big, data=arr_bytes)


def pack(rows: np.ndarray, pad: int = 0) -> tuple[bytes, int]:
    """(H, row_bytes) uint8 -> bytes with `pad` garbage bytes after every row, and the step."""
    rows = rows.reshape(rows.shape[0], -1).view(np.uint8)
    if pad:
        garbage = np.full((rows.shape[0], pad), 0xEE, np.uint8)
        rows = np.concatenate([rows, garbage], axis=1)
    return rows.tobytes(), rows.shape[1]


def build(arr: np.ndarray, encoding: str, pad: int = 0, big: bool = False):
    a = arr.astype(arr.dtype.newbyteorder(">" if big else "<"))
    data, step = pack(a.view(np.uint8).reshape(a.shape[0], -1), pad)
    return msg(data, h=arr.shape[0], w=arr.shape[1], encoding=encoding, step=step, big=int(big))


def scale16(v):  # the oracle: round(v * 255 / 65535)
    return np.rint(v.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)


@pytest.mark.parametrize("pad", [0, 3, 8])
def test_8bit_colour_encodings(pad):
    alpha = np.full((H, W, 1), 77, np.uint8)
    cases = {
        "rgb8": RGB,
        "bgr8": RGB[..., ::-1],
        "rgba8": np.concatenate([RGB, alpha], axis=2),
        "bgra8": np.concatenate([RGB[..., ::-1], alpha], axis=2),
    }
    for enc, arr in cases.items():
        out = C.imgmsg_to_rgb(build(np.ascontiguousarray(arr), enc, pad))
        assert out.shape == (H, W, 3) and out.dtype == np.uint8, enc
        np.testing.assert_array_equal(out, RGB, err_msg=enc)


def test_mono8_and_8uc1():
    g = RGB[..., 0].copy()
    for enc in ("mono8", "8UC1"):
        out = C.imgmsg_to_rgb(build(g, enc, pad=2))
        np.testing.assert_array_equal(out, np.stack([g] * 3, axis=2))


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("enc", ["mono16", "16UC1"])
def test_16bit_grey_both_byte_orders(enc, big):
    v = np.random.default_rng(2).integers(0, 65536, (H, W), dtype=np.uint16)
    v[0, :4] = [0, 128, 65535, 257 * 100 + 128]
    m = build(v, enc, pad=4, big=big)
    np.testing.assert_array_equal(C.imgmsg_to_numpy(m), v)  # passthrough: native order, values intact
    out = C.imgmsg_to_rgb(m)
    np.testing.assert_array_equal(out, np.stack([scale16(v)] * 3, axis=2))


@pytest.mark.parametrize("big", [False, True])
def test_16bit_colour(big):
    v = np.random.default_rng(3).integers(0, 65536, (H, W, 3), dtype=np.uint16)
    np.testing.assert_array_equal(C.imgmsg_to_rgb(build(v, "rgb16", 2, big)), scale16(v))
    np.testing.assert_array_equal(C.imgmsg_to_rgb(build(np.ascontiguousarray(v[..., ::-1]), "bgr16", 0, big)),
                                  scale16(v))


def yuv_oracle(y, u, v):
    """BT.601 video range, as OpenCV's YUV422 -> RGB (float formula, then compared with tolerance 1)."""
    yy = np.maximum(y.astype(np.float64) - 16, 0) * 1.164
    r = yy + 1.596 * (v - 128.0)
    g = yy - 0.391 * (u - 128.0) - 0.813 * (v - 128.0)
    b = yy + 2.018 * (u - 128.0)
    return np.clip(np.rint(np.stack([r, g, b], axis=-1)), 0, 255)


@pytest.mark.parametrize("enc,layout", [("yuv422", "uyvy"), ("uyvy", "uyvy"), ("yuv422_yuy2", "yuyv"),
                                        ("yuyv", "yuyv")])
def test_yuv422_layouts(enc, layout):
    rng = np.random.default_rng(4)
    y = rng.integers(0, 256, (H, W), dtype=np.uint8)
    u = rng.integers(0, 256, (H, W // 2), dtype=np.uint8)
    v = rng.integers(0, 256, (H, W // 2), dtype=np.uint8)
    packed = np.empty((H, W // 2, 4), np.uint8)
    if layout == "uyvy":  # cv_bridge: yuv422 = UYVY (U0 Y0 V0 Y1)
        packed[..., 0], packed[..., 1], packed[..., 2], packed[..., 3] = u, y[:, 0::2], v, y[:, 1::2]
    else:  # cv_bridge: yuv422_yuy2 = YUYV (Y0 U0 Y1 V0)
        packed[..., 0], packed[..., 1], packed[..., 2], packed[..., 3] = y[:, 0::2], u, y[:, 1::2], v
    m = build(packed.reshape(H, W, 2), enc, pad=6)
    out = C.imgmsg_to_rgb(m)
    uu, vv = np.repeat(u, 2, axis=1), np.repeat(v, 2, axis=1)
    assert np.abs(out.astype(int) - yuv_oracle(y, uu, vv)).max() <= 1


def test_known_yuv_values():
    # video-range black, white and pure grey, UYVY
    pairs = np.array([[[128, 16, 128, 16], [128, 235, 128, 235], [128, 126, 128, 126]]], np.uint8)
    out = C.imgmsg_to_rgb(build(pairs.reshape(1, 6, 2), "yuv422"))
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[0, 2], [255, 255, 255])
    assert len(set(out[0, 4].tolist())) == 1


def test_zero_copy_views():
    m = build(RGB, "rgb8", pad=5)
    m.data = bytearray(m.data)
    out = C.imgmsg_to_rgb(m)
    assert np.shares_memory(out, np.frombuffer(m.data, np.uint8))
    assert not out.flags.writeable
    bgr = build(np.ascontiguousarray(RGB[..., ::-1]), "bgr8")
    bgr.data = bytearray(bgr.data)
    assert np.shares_memory(C.imgmsg_to_rgb(bgr), np.frombuffer(bgr.data, np.uint8))
    mono = build(RGB[..., 0].copy(), "mono8")
    mono.data = bytearray(mono.data)
    assert np.shares_memory(C.imgmsg_to_rgb(mono), np.frombuffer(mono.data, np.uint8))


def test_real_sensor_msgs_image_roundtrip():
    from sensor_msgs.msg import Image

    m = C.numpy_to_imgmsg(RGB, "rgb8")
    assert isinstance(m, Image) and m.step == W * 3 and m.height == H
    np.testing.assert_array_equal(C.imgmsg_to_rgb(m), RGB)
    m = C.numpy_to_imgmsg(np.ascontiguousarray(RGB[..., ::-1]), "bgr8")
    np.testing.assert_array_equal(C.imgmsg_to_rgb(m), RGB)
    v = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 1000
    m = C.numpy_to_imgmsg(v, "mono16")
    assert m.is_bigendian == (sys.byteorder == "big") and m.step == W * 2
    np.testing.assert_array_equal(C.imgmsg_to_numpy(m), v)
    with pytest.raises(C.ImageConversionError, match="dtype"):
        C.numpy_to_imgmsg(v, "rgb8")
    with pytest.raises(C.ImageConversionError, match="shape"):
        C.numpy_to_imgmsg(RGB[..., 0], "rgb8")


def _jpeg(rgb, **kw) -> bytes:
    b = io.BytesIO()
    PILImage.fromarray(rgb).save(b, format="JPEG", **kw)
    return b.getvalue()


def _png(arr, mode=None) -> bytes:
    b = io.BytesIO()
    PILImage.fromarray(arr, mode).save(b, format="PNG") if mode else PILImage.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def cmsg(data: bytes, fmt="jpeg"):
    return types.SimpleNamespace(format=fmt, data=data)


def test_compressed_png_exact_and_jpeg_close():
    big = np.random.default_rng(5).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    np.testing.assert_array_equal(C.compressed_to_rgb(cmsg(_png(big), "png")), big)
    smooth = np.tile(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], (32, 1, 3))
    out = C.compressed_to_rgb(cmsg(_jpeg(smooth, quality=95), "rgb8; jpeg compressed bgr8"))
    assert out.shape == (32, 40, 3) and np.abs(out.astype(int) - smooth).mean() < 2
    grey = C.compressed_to_rgb(cmsg(_png(big[..., 0]), "png"))
    np.testing.assert_array_equal(grey, np.stack([big[..., 0]] * 3, axis=2))
    rgba = np.concatenate([big, np.full((32, 40, 1), 9, np.uint8)], axis=2)
    np.testing.assert_array_equal(C.compressed_to_rgb(cmsg(_png(rgba), "png")), big)


def test_compressed_png16_scaled_like_mono16():
    v = np.random.default_rng(6).integers(0, 65536, (8, 10), dtype=np.uint16)
    out = C.compressed_to_rgb(cmsg(_png(v), "png"))
    np.testing.assert_array_equal(out[..., 0], scale16(v))


def test_rgb_to_compressed_roundtrip():
    m = C.rgb_to_compressed(RGB, "png")
    assert m.format == "png"
    np.testing.assert_array_equal(C.compressed_to_rgb(m), RGB)
    assert C.rgb_to_compressed(RGB, "jpeg").format == "jpeg"


BAD = [
    ("unknown encoding", msg(RGB.tobytes(), encoding="weird42", step=W * 3), "unknown or unsupported"),
    ("encoding not a string", msg(RGB.tobytes(), encoding=None, step=W * 3), "encoding must be a string"),
    ("zero height", msg(b"", h=0, step=W * 3), "zero-size"),
    ("zero width", msg(b"", w=0, step=0), "zero-size"),
    ("step too small", msg(RGB.tobytes(), step=W * 3 - 1), "step 17 is smaller"),
    ("data shorter than height*step", msg(RGB.tobytes()[:-1], step=W * 3), "data too short"),
    ("padded step, unpadded data", msg(RGB.tobytes(), step=W * 3 + 4), "data too short"),
    ("odd width yuv422", msg(b"\0" * (H * 5 * 2), w=5, encoding="yuv422", step=10), "even width"),
    ("mono16 short", msg(b"\0" * (H * W), encoding="mono16", step=W * 2), "data too short"),
    ("huge dims", msg(b"", h=100000, w=100000, step=300000), "too large"),
    ("negative step", msg(RGB.tobytes(), step=-1), "step -1 is smaller"),
]


@pytest.mark.parametrize("name,m,match", BAD, ids=[b[0] for b in BAD])
def test_bad_raw_images(name, m, match):
    with pytest.raises(C.ImageConversionError, match=match):
        C.imgmsg_to_rgb(m)


def test_bad_compressed_images():
    good = _jpeg(RGB)
    cases = [
        (cmsg(b""), "empty"),
        (cmsg(good[: len(good) // 2]), "corrupt or truncated JPEG"),
        (cmsg(b"\xff\xd8" + b"\x00" * 100), "corrupt or truncated JPEG"),
        (cmsg(b"GIF89a" + b"\0" * 20), "neither JPEG nor PNG"),
        (cmsg(_png(RGB)[:30], "png"), "corrupt or truncated PNG"),
        (cmsg(good, "16UC1; compressedDepth png"), "compressedDepth"),
    ]
    for m, match in cases:
        with pytest.raises(C.ImageConversionError, match=match):
            C.compressed_to_rgb(m)
    with pytest.raises(C.ImageConversionError, match="too large"):
        C.compressed_to_rgb(cmsg(_png(np.zeros((64, 64, 3), np.uint8)), "png"), max_pixels=100)


def test_errors_are_value_errors():
    assert issubclass(C.ImageConversionError, ValueError)


# ---------------------------------------------------------------------------------------------- real cv_bridge / cv2

ALL_ENCODINGS = ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "yuv422", "yuv422_yuy2"]


def _random_for(enc, rng):
    spec = C.ENCODINGS[enc]
    dt = np.uint16 if spec.dtype == "u2" else np.uint8
    shape = (H, W) if spec.channels == 1 else (H, W, spec.channels)
    return rng.integers(0, np.iinfo(dt).max + 1, shape, dtype=dt)


def test_same_arrays_as_real_cv_bridge():
    cv_bridge = pytest.importorskip(
        "cv_bridge", reason="cv_bridge is not installable from PyPI (it comes with a ROS install): comparison skipped")
    bridge = cv_bridge.CvBridge()
    rng = np.random.default_rng(7)
    for enc in ALL_ENCODINGS + ["16UC1"]:
        arr = _random_for(enc, rng)
        for big in (False, True):
            m = build(arr, enc, pad=4, big=big)
            np.testing.assert_array_equal(C.imgmsg_to_numpy(m), bridge.imgmsg_to_cv2(m, "passthrough"), err_msg=enc)
            if enc != "16UC1":  # cv_bridge refuses 16UC1 -> rgb8 (not a colour format)
                np.testing.assert_array_equal(C.imgmsg_to_rgb(m), bridge.imgmsg_to_cv2(m, "rgb8"), err_msg=enc)


def test_same_arrays_as_opencv():
    cv2 = pytest.importorskip("cv2", reason="opencv-python is not a dependency; install it to run this comparison")
    rng = np.random.default_rng(8)
    codes = {"bgr8": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB, "bgra8": cv2.COLOR_BGRA2RGB,
             "mono8": cv2.COLOR_GRAY2RGB, "yuv422": cv2.COLOR_YUV2RGB_UYVY, "yuv422_yuy2": cv2.COLOR_YUV2RGB_YUY2}
    for enc, code in codes.items():
        arr = np.ascontiguousarray(_random_for(enc, rng))
        np.testing.assert_array_equal(C.imgmsg_to_rgb(build(arr, enc, pad=2)), cv2.cvtColor(arr, code), err_msg=enc)
    v = _random_for("mono16", rng)
    ref = cv2.cvtColor(cv2.convertScaleAbs(v, alpha=255.0 / 65535.0), cv2.COLOR_GRAY2RGB)
    np.testing.assert_array_equal(C.imgmsg_to_rgb(build(v, "mono16")), ref)
    jpg = _jpeg(np.random.default_rng(9).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    ref = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.abs(C.compressed_to_rgb(cmsg(jpg)).astype(int) - ref).max() <= 2  # two libjpeg builds

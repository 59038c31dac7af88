"""Frame validation and resizing, before anything touches the cache.

Rules (documented public behaviour):
  * numpy array (a PIL image is converted), HxWx3 RGB uint8 is the native form;
  * grayscale HxW or HxWx1 -> replicated to RGB; HxWx4 RGBA -> alpha dropped;
  * float arrays with every value in [0, 1] -> scaled by 255 and rounded; any other dtype, NaN/inf, or a float
    outside [0, 1] -> InvalidFrameError; empty (0-sized) arrays -> InvalidFrameError;
  * any size is accepted: the longer side is brought down to `max_side` (aspect kept), and a side under
    `min_side` is brought up to it (1x1 and 8000x8000 both work).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from infmllm_ros.engine.errors import InvalidFrameError


def to_rgb(frame) -> np.ndarray:
    """Validate and normalise to a contiguous HxWx3 uint8 array."""
    if isinstance(frame, Image.Image):
        frame = np.asarray(frame.convert("RGB"))
    if not isinstance(frame, np.ndarray):
        raise InvalidFrameError(f"frame must be a numpy array HxWx3 uint8 RGB, got {type(frame).__name__}")
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3 or frame.shape[2] not in (1, 3, 4):
        raise InvalidFrameError(f"frame must be HxW, HxWx1, HxWx3 or HxWx4, got shape {frame.shape}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise InvalidFrameError(f"frame is empty: shape {frame.shape}")
    if frame.dtype == np.uint8:
        pass
    elif frame.dtype.kind == "f":
        if not np.isfinite(frame).all():
            raise InvalidFrameError("float frame contains NaN or inf")
        lo, hi = float(frame.min()), float(frame.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidFrameError(f"float frame must lie in [0, 1] (got [{lo:g}, {hi:g}]); send uint8 0..255")
        frame = np.rint(frame * 255.0).astype(np.uint8)
    else:
        raise InvalidFrameError(f"frame dtype must be uint8 (or float in [0, 1]), got {frame.dtype}")
    if frame.shape[2] == 1:
        frame = np.repeat(frame, 3, axis=2)
    elif frame.shape[2] == 4:
        frame = frame[:, :, :3]
    return np.ascontiguousarray(frame)


def fit(rgb: np.ndarray, min_side: int, max_side: int) -> Image.Image:
    """PIL image with longer side <= max_side and both sides >= min_side."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    nh, nw = max(min_side, round(h * scale)), max(min_side, round(w * scale))
    img = Image.fromarray(rgb)
    return img if (nh, nw) == (h, w) else img.resize((nw, nh), Image.BICUBIC)

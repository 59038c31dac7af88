"""int8 per-channel symmetric quantization of one frame's K or V tensor [layers, heads, n, D].

One scale per (layer, head, channel), taken over the frame's n tokens: keys have a few large channels (the
RoPE low-frequency pairs), so a per-channel scale keeps the small channels from being rounded to zero, and a
per-frame scale needs no state beyond the page itself.

Scales are stored as fp16 (half the bytes of fp32) and rounded *up* to the next fp16 value, so
|x / scale| <= 127 still holds and no element is clamped. Documented bound, per element, for the fp32
dequantization:   |x - dequantize(q, scale)| <= scale / 2   (plus fp32 rounding of the product, ~1e-7 relative).
A channel that is all zeros gets scale 0 and dequantizes exactly.
"""

import torch

QMAX = 127
SCALE_DTYPE = torch.float16


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [layers, heads, n, D] (any float dtype) -> (q int8 same shape, scale fp16 [layers, heads, 1, D])."""
    if x.dim() != 4:
        raise ValueError(f"expected [layers, heads, n, D], got shape {tuple(x.shape)}")
    xf = x.float()
    scale = xf.abs().amax(dim=2, keepdim=True) / QMAX
    scale16 = scale.to(SCALE_DTYPE)
    # fp16 rounding may have gone down: step up once so the stored scale is >= amax / 127 (no clamping needed)
    low = scale16.float() < scale
    scale16 = torch.where(low, torch.nextafter(scale16, torch.full_like(scale16, float("inf"))), scale16)
    s = scale16.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(xf / safe).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale16


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize: q.float() * scale, cast to dtype (cast after the product, so fp32 meets the bound)."""
    return (q.float() * scale.float()).to(dtype)

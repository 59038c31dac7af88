"""Bad input is rejected with a clear error and leaves the session exactly as it was; the documented conversions
(grayscale, RGBA, float in [0, 1], tiny and huge frames, long instructions) work and stay NaN-free."""

import warnings

import numpy as np
import pytest
import torch
from engine_helpers import frame, make_session

from infmllm_ros.cache import CacheConfig
from infmllm_ros.engine import InvalidFrameError, InvalidInstructionError

CFG = dict(policy="saddle", budget=256, recent=32, window=16, max_chunk=128, max_new_tokens=8)

BAD_FRAMES = [
    ("not an array", "frame must be a numpy array"),
    (None, "frame must be a numpy array"),
    (np.zeros((32,), np.uint8), "HxW"),
    (np.zeros((32, 32, 5), np.uint8), "HxW"),
    (np.zeros((2, 32, 32, 3), np.uint8), "HxW"),
    (np.zeros((0, 32, 3), np.uint8), "empty"),
    (np.zeros((32, 32, 3), np.uint16), "dtype"),
    (np.zeros((32, 32, 3), np.int64), "dtype"),
    (np.zeros((32, 32, 3), bool), "dtype"),
    (np.full((32, 32, 3), 2.0, np.float32), r"\[0, 1\]"),
    (np.full((32, 32, 3), -0.1, np.float64), r"\[0, 1\]"),
    (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
]
BAD_INSTRUCTIONS = [("", "empty"), ("   \n\t", "empty"), ("\x00", "empty"), (None, "str"), (42, "str"),
                    (b"go", "str")]


@pytest.mark.parametrize("fam", ["llava_llama", "qwen2_vl", "smolvlm"])
def test_rejected_input_leaves_session_unchanged(tiny, fam):
    model, proc = tiny(fam)
    fresh, s = (make_session(model, proc, CacheConfig(**CFG)) for _ in range(2))
    for x in (fresh, s):
        x.observe(frame(1), 0.0)
    before = s.stats()
    for bad, msg in BAD_FRAMES:
        with pytest.raises(InvalidFrameError, match=msg):
            s.observe(bad, 1.0)
    for stamp in (float("nan"), float("inf"), None, "1.0", True):
        with pytest.raises(InvalidFrameError, match="stamp"):
            s.observe(frame(2), stamp)
    for bad, msg in BAD_INSTRUCTIONS:
        with pytest.raises(InvalidInstructionError, match=msg):
            s.ask(bad)
    for kw in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=0)):
        with pytest.raises(InvalidInstructionError):
            s.ask("go", **kw)
    after = s.stats()
    for k in ("frames_seen", "tokens_seen", "tokens_stored", "next_position", "questions"):
        assert after[k] == before[k], k
    # still usable, and identical to a session that never saw the bad input
    for x in (fresh, s):
        x.observe(frame(2), 1.0)
    a, b = (x.ask("Describe the image.", max_new_tokens=4, output_logits=True) for x in (fresh, s))
    assert torch.isfinite(b.logits).all()
    assert a.tokens == b.tokens
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)


def _logits_after(model, proc, img, **kw):
    s = make_session(model, proc, CacheConfig(**CFG), **kw)
    s.observe(img, 0.0)
    return s.ask("Describe the image.", max_new_tokens=2, output_logits=True).logits


@pytest.mark.parametrize("fam", ["llava_onevision", "qwen2_vl", "idefics3"])
def test_documented_conversions(tiny, fam):
    model, proc = tiny(fam)
    rgb = frame(5)
    ref = _logits_after(model, proc, rgb)
    gray = rgb[:, :, 0]
    gray3 = np.repeat(gray[:, :, None], 3, axis=2)
    same = [
        (np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]), rgb),  # RGBA: alpha dropped
        (gray, gray3),  # HxW replicated
        (gray[:, :, None], gray3),  # HxWx1 replicated
        (rgb.astype(np.float32) / 255.0, rgb),  # float in [0, 1] -> *255, rounded
    ]
    for x, want in same:
        torch.testing.assert_close(_logits_after(model, proc, x), _logits_after(model, proc, want), atol=0, rtol=0)
    assert not torch.equal(ref, _logits_after(model, proc, gray3))  # the frame content does reach the model
    # any size is resized into the adapter's bounds
    s = make_session(model, proc, CacheConfig(**CFG))
    n_small = s.observe(np.full((1, 1, 3), 200, np.uint8), 0.0)
    n_huge = s.observe(np.full((8000, 8000, 3), 30, np.uint8), 1.0)
    n_wide = s.observe(np.full((2, 3000, 3), 30, np.uint8), 2.0)
    assert 0 < n_small <= CFG["max_chunk"] and 0 < n_huge <= CFG["max_chunk"] and 0 < n_wide <= CFG["max_chunk"]
    a = s.ask("Describe the image.", max_new_tokens=3, output_logits=True)
    assert torch.isfinite(a.logits).all() and len(a.tokens) == 3


def test_long_instruction_truncated_with_warning(tiny):
    model, proc = tiny("qwen2_vl")
    s = make_session(model, proc, CacheConfig(**CFG))
    s.observe(frame(1), 0.0)
    with pytest.warns(UserWarning, match="truncated"):
        a = s.ask("Move forward and turn left. " * 200, max_new_tokens=3, output_logits=True)
    assert s.stats()["last_question_tokens"] <= CFG["max_chunk"] and s.stats()["truncations"] == 1
    assert torch.isfinite(a.logits).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal question afterwards: no warning, works
        s.observe(frame(2), 1.0)
        assert len(s.ask("Stop.", max_new_tokens=2).tokens) == 2


def test_special_token_text_in_instruction_is_plain_text(tiny):
    """'<image>' typed by a user must not become an image placeholder (that would crash the forward)."""
    for fam in ("llava_llama", "qwen2_vl", "idefics3"):
        model, proc = tiny(fam)
        s = make_session(model, proc, CacheConfig(**CFG), trace=True)
        placeholder = proc.tokenizer.decode([s.adapter.image_token_id()])
        text = f"look {placeholder} <|im_end|> <image> <fake_token_around_image>"
        a = s.ask(text, max_new_tokens=2, output_logits=True)
        assert torch.isfinite(a.logits).all()
        assert s.adapter.image_token_id() not in s.fed_ids


def test_too_many_new_tokens_clipped(tiny):
    model, proc = tiny("llava_llama")
    s = make_session(model, proc, CacheConfig(**CFG))
    with pytest.warns(UserWarning, match="clipped"):
        a = s.ask("go", max_new_tokens=100)
    assert len(a.tokens) == CFG["max_new_tokens"]


def test_frame_larger_than_max_chunk_rejected(tiny):
    model, proc = tiny("llava_llama")
    s = make_session(model, proc, CacheConfig(policy="saddle", budget=64, recent=8, max_chunk=24, max_new_tokens=4),
                     system_prompt=None)
    with pytest.raises(InvalidFrameError, match="max_chunk"):
        s.observe(frame(1), 0.0)
    assert s.stats()["tokens_seen"] == 0
    a = s.ask("Describe the image.", max_new_tokens=2, output_logits=True)
    assert torch.isfinite(a.logits).all()


def test_numpy_stamps_accepted(tiny):
    model, proc = tiny("llava_llama")
    s = make_session(model, proc, CacheConfig(**CFG))
    s.observe(frame(1), np.float32(1.5))
    s.observe(frame(2), np.int64(2))
    assert s.stats()["last_stamp"] == 2.0 and s.stats()["frames_seen"] == 2


def test_time_marker_relative_to_first_frame(tiny):
    """Epoch header stamps: the marker counts seconds since the first frame (after reset); answers report the raw
    stamp so the node can match the header."""
    model, proc = tiny("qwen2_vl")
    epoch = 1764150000.0
    a, b = (make_session(model, proc, CacheConfig(**CFG), trace=True) for _ in range(2))
    for x, base in ((a, epoch), (b, 0.0)):
        x.observe(frame(1), base + 0.0)
        x.observe(frame(2), base + 2.5)
    assert a.fed_ids == b.fed_ids
    assert "t=2.5s" in proc.tokenizer.decode(a.fed_ids)
    assert a.ask("Describe the image.", max_new_tokens=2).frame_stamp == epoch + 2.5
    a.reset()
    a.observe(frame(1), epoch + 100.0)
    assert "t=0.0s" in proc.tokenizer.decode(a.fed_ids)


@pytest.mark.parametrize("fam", ["llava_llama", "llava_onevision", "idefics3", "smolvlm"])
def test_tokens_per_frame_do_not_depend_on_frame_size(tiny, fam):
    """Tile families are resized to one tile: a VGA camera costs what a tile-sized frame costs (no anyres growth,
    no Idefics3 splitting). Onevision still unpads by aspect ratio, so its sizes keep one aspect ratio here."""
    model, proc = tiny(fam)
    s = make_session(model, proc, CacheConfig(**CFG), system_prompt=None)
    counts = set()
    sizes = ((3, 4), (36, 48), (48, 64), (480, 640)) if fam == "llava_onevision" else \
        ((1, 1), (32, 32), (48, 64), (480, 640), (64, 20))
    for h, w in sizes:
        s.reset()
        counts.add(s.observe(frame(0, h, w), 0.0))
    assert len(counts) == 1

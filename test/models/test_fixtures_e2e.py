"""Real-shape fixtures through the node's own session path (session_factory.make_session with the node's default
parameters and model:=<dir>): each answers on 640x480 frames; tokens per frame equal the processor's own count run
by hand; KV bytes equal docs/MODELS.md's bytes per token."""

import math

import numpy as np
import pytest
import transformers as tf
from fixture_build import NAMES, fixture_json
from PIL import Image

from infmllm_ros.ros import session_factory

# The node's defaults for the parameters this helper consumes (agreed with the node's declarations).
NODE_DEFAULTS = {"frame.tokens": 256, "frame.max_side": 0, "cache.budget": 0, "cache.budget_frames": 8,
                 "cache.max_chunk": 0, "cache.window": 0, "dtype": "auto", "device": "cpu",
                 "generation.max_new_tokens": 64, "actions.max_new_tokens": 64}
# docs/MODELS.md: KV bytes per token in bf16 = 2 (K, V) x layers x KV heads x head_dim x 2 bytes, real layer counts
DOC_KV_BYTES_PER_TOKEN = {"SmolVLM-256M-Instruct": 23040, "SmolVLM2-2.2B-Instruct": 196608,
                          "llava-onevision-qwen2-0.5b-ov-hf": 12288, "llava-1.5-7b-hf": 524288,
                          "Qwen2-VL-2B-Instruct": 28672, "Qwen2.5-VL-3B-Instruct": 36864,
                          "Qwen2.5-VL-7B-Instruct": 57344}
VGA = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))


def image_tokens_by_hand(name: str, frame_tokens: int) -> int:
    """The family's own image processor, configured by hand as the docs say frame.tokens maps, on a 640x480 frame."""
    cfg, pre = fixture_json(name, "config.json"), fixture_json(name, "preprocessor_config.json")
    pre = {k: v for k, v in pre.items() if k not in ("image_processor_type", "processor_class", "video_sampling")}
    mt = cfg["model_type"]
    if mt.startswith("qwen2"):
        pre.update(min_pixels=3136, max_pixels=frame_tokens * 28 * 28)
        grid = tf.Qwen2VLImageProcessorPil(**pre)(VGA, return_tensors="pt")["image_grid_thw"][0]
        return int(grid.prod()) // 4
    if mt in ("idefics3", "smolvlm"):  # a split grid costs more than 256 at 640x480 -> splitting off: 1 tile
        cls = tf.Idefics3ImageProcessorPil if mt == "idefics3" else tf.SmolVLMImageProcessorPil
        px = cls(**pre)(VGA, do_image_splitting=False, return_tensors="pt")["pixel_values"]
        return px.shape[1] * fixture_json(name, "processor_config.json")["image_seq_len"]
    if mt == "llava":
        px = tf.CLIPImageProcessorPil(**pre)(VGA, return_tensors="pt")["pixel_values"]
        return (px.shape[-1] // cfg["vision_config"]["patch_size"]) ** 2
    if mt == "llava_onevision":  # anyres costs > 256 -> the video path: 2x2-pooled 27x27 grid + 1 newline
        side = cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]
        return math.ceil(side / 2) ** 2 + 1
    raise AssertionError(mt)


def visual_ids(session) -> set[int]:
    c = session.model.config
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    return {getattr(c, n) for n in names if isinstance(getattr(c, n, None), int)}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_fixture_answers_with_node_defaults(name, fixture_dir):
    s = session_factory.make_session(dict(NODE_DEFAULTS, model=str(fixture_dir(name))))
    s.trace = True
    n = s.observe(np.asarray(VGA), 0.0)
    ids = visual_ids(s)
    got = sum(1 for t in s.fed_ids if t in ids)
    assert got == image_tokens_by_hand(name, 256)
    assert n == s.tokens_per_frame == s.stats()["tokens_per_frame"]
    if name != "llava-1.5-7b-hf":  # LLaVA-1.5 has one fixed 336 px tile: 576 tokens whatever frame.tokens says
        assert got <= 256
    s.observe(np.asarray(VGA)[:, ::-1].copy(), 1.0)
    a = s.ask("What is in front of the robot?", max_new_tokens=3)
    assert len(a.tokens) >= 1 and a.finish_reason in ("eos", "length")
    # KV: capacity slots x the documented bytes per token, scaled to the built layer count and the session dtype
    real_layers = fixture_json(name, "config.json")["text_config"]["num_hidden_layers"]
    text = s.model.config.get_text_config()
    elem = s.cache.layers[0].keys.element_size() if hasattr(s.cache, "layers") else 4
    per_token = DOC_KV_BYTES_PER_TOKEN[name] * text.num_hidden_layers // real_layers * elem // 2
    # on CPU the cache keeps a third buffer, the keys as attention reads them (BoundedCache.read_copy)
    copies = 3 if s.cache.read_copy else 2
    assert s.kv_bytes == per_token * s.cache_cfg.capacity * copies // 2  # cache_cfg: + an answer's closing tokens
    assert s.kv_bytes == s.cache.kv_bytes
    # auto sizes: a chunk holds the largest frame; the budget 8 frames unless max_position_embeddings caps it
    cap = text.max_position_embeddings - s.cfg.max_chunk - s.cfg.max_new_tokens
    assert s.cfg.max_chunk >= s.max_frame_tokens and s.cfg.budget == min(max(8 * s.tokens_per_frame, 512), cap)


@pytest.mark.slow
@pytest.mark.parametrize("frame_tokens", [64, 1024])
def test_qwen_frame_tokens_follow_max_pixels(frame_tokens, fixture_dir):
    name = "Qwen2-VL-2B-Instruct"
    params = dict(NODE_DEFAULTS, model=str(fixture_dir(name)), **{"frame.tokens": frame_tokens})
    s = session_factory.make_session(params)
    s.trace = True
    s.observe(np.asarray(VGA), 0.0)
    got = sum(1 for t in s.fed_ids if t in visual_ids(s))
    assert got == image_tokens_by_hand(name, frame_tokens) <= frame_tokens


@pytest.mark.slow
def test_smolvlm_splits_when_frame_tokens_allow(fixture_dir):
    name = "SmolVLM-256M-Instruct"
    s = session_factory.make_session(dict(NODE_DEFAULTS, model=str(fixture_dir(name)), **{"frame.tokens": 1024}))
    s.trace = True
    s.observe(np.asarray(VGA), 0.0)
    got = sum(1 for t in s.fed_ids if t in visual_ids(s))
    pre = {k: v for k, v in fixture_json(name, "preprocessor_config.json").items()
           if k not in ("image_processor_type", "processor_class", "video_sampling")}
    # by hand: splitting on at the checkpoint's own longest_edge 2048 -> 4x3 tiles + the global one, 64 tokens each
    px = tf.Idefics3ImageProcessorPil(**pre)(VGA, do_image_splitting=True, return_tensors="pt")["pixel_values"]
    assert got == px.shape[1] * 64 == 13 * 64 and s.tokens_per_frame <= 1024

"""The attention function and the cache in every VLM family: the extra forward kwarg reaches the text attention
(scores arrive in every layer), only the text model is switched, and image + text chunks streamed through
BoundedCache equal one full forward (budget >= stream); with a small budget the stream still runs, bounded."""

import numpy as np
import pytest
import torch
from PIL import Image

from infmllm_ros import attention
from infmllm_ros.cache import BoundedCache, CacheConfig

tiny = pytest.importorskip("infmllm_ros.engine.tiny")


def _inputs(proc):
    img = Image.fromarray((np.random.RandomState(0).rand(40, 60, 3) * 255).astype("uint8"))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe it."}]}]
    inputs = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")  # fmt: skip
    inputs.pop("attention_mask")  # a chunk-local 2D mask would hide the cache (pitfall 6)
    text = proc.tokenizer(" Move forward and turn left.", add_special_tokens=False, return_tensors="pt").input_ids
    return dict(inputs), text


def _positions(model, chunk, cache, inputs):
    q = chunk.shape[1]
    if cache.rows == 1:
        return (cache.next_position + torch.arange(q))[None]
    if "image_grid_thw" in inputs:  # Qwen2-VL: M-RoPE layout of the chunk, shifted to the next free position
        pos, _ = model.model.get_rope_index(chunk, mm_token_type_ids=inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"],
                                            attention_mask=torch.ones_like(chunk))  # fmt: skip
        return pos + cache.next_position
    return (cache.next_position + torch.arange(q)).view(1, 1, q).expand(3, 1, q)


@torch.no_grad()
def _stream(model, cache, inputs, text):
    outs = []
    for chunk, extra in ((inputs["input_ids"], inputs), (text, {})):
        pos = _positions(model, chunk, cache, extra)
        kw = {k: v for k, v in extra.items() if k not in ("input_ids", "mm_token_type_ids")}
        cache.begin_forward(pos, prefill=True)
        outs.append(model(input_ids=chunk, position_ids=pos, cache=cache, use_cache=True, **kw,
                          **cache.forward_kwargs()).logits)  # fmt: skip
        assert all(layer.scored == layer.stored for layer in cache.layers)  # scores reached every text layer
        cache.end_chunk()
    return torch.cat(outs, 1)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_family_streams_through_the_bounded_cache(family):
    model, proc = tiny.build(family)
    attention.install(model)
    cfg = model.config
    assert cfg.get_text_config()._attn_implementation == attention.NAME
    assert cfg.vision_config._attn_implementation != attention.NAME
    inputs, text = _inputs(proc)
    n = inputs["input_ids"].shape[1] + text.shape[1]
    cache = BoundedCache(CacheConfig(policy="saddle", budget=128, recent=8, window=8, max_chunk=96,
                                     max_new_tokens=0), cfg)  # fmt: skip
    got = _stream(model, cache, inputs, text)
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], text], 1))
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(text)], 1)
    with torch.no_grad():
        want = model(**full).logits
    assert (got - want).abs().max().item() < 1e-5
    assert cache.seen == n and cache.evictions == 0

    small = BoundedCache(CacheConfig(policy="saddle", budget=12, recent=4, window=8, max_chunk=96,
                                     max_new_tokens=0), cfg)  # fmt: skip
    out = _stream(model, small, inputs, text)
    assert torch.isfinite(out).all() and small.stored == 12 and small.evictions == 2 and small.seen == n
    assert small.next_position <= 12 + 96


@pytest.mark.parametrize("family,placeholder", [("qwen2_vl", "<|vision_start|><|image_pad|><|vision_end|>"),
                                                ("llava_llama", "<image>\n")])  # fmt: skip
def test_new_image_in_a_later_chunk(family, placeholder):
    """Check of truth 4: a second image arriving in chunk 2 (Qwen2-VL: its own M-RoPE layout from get_rope_index,
    shifted to cache.next_position) equals the full-sequence forward with both images."""
    model, proc = tiny.build(family)
    attention.install(model)
    first, _ = _inputs(proc)
    img2 = Image.fromarray((np.random.RandomState(1).rand(40, 60, 3) * 255).astype("uint8"))
    second = dict(proc(text=[placeholder + " What changed?"], images=[img2], return_tensors="pt"))
    second.pop("attention_mask")
    cache = BoundedCache(CacheConfig(policy="h2o", budget=128, recent=8, max_chunk=96, max_new_tokens=0), model.config)
    outs = []
    with torch.no_grad():
        for chunk in (first, second):
            ids = chunk["input_ids"]
            pos = _positions(model, ids, cache, chunk)
            kw = {k: v for k, v in chunk.items() if k not in ("input_ids", "mm_token_type_ids")}
            cache.begin_forward(pos, prefill=True)
            outs.append(model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, **kw,
                              **cache.forward_kwargs()).logits)  # fmt: skip
            cache.end_chunk()
        full = {k: torch.cat([first[k], second[k]], 1 if k in ("input_ids", "mm_token_type_ids") else 0)
                for k in first}  # fmt: skip
        want = model(**full).logits
    assert (torch.cat(outs, 1) - want).abs().max().item() < 1e-5

"""Exactness in every dtype over unbounded evictions (issue 12 item 1): after >= 1000 evictions, each key attention
reads is within 2x of the key rotated DIRECTLY at its current position (error against an fp64 rotation), for 1-D
RoPE (default, llama3, yarn) and Qwen2-VL M-RoPE, in bf16 and fp16. The old design (re-rotating stored keys by
delta at every eviction) fails this by far; the test shows that too, so it can fail."""

import pytest
import torch
from cache_helpers import VOCAB, tiny_lm
from infmllm_ros.kernels import rotate_keys_ref
from transformers import LlamaConfig, Qwen2VLTextConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from infmllm_ros.cache import BoundedCache, CacheConfig
from infmllm_ros.cache.rope import freq_rows_of, inv_freq_from_config, mrope_section_of

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
    "mrope": {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e4},
}  # fmt: skip
HEADS, HEAD_DIM, FILL, EVICTIONS = 1, 64, 1024, 1000  # 24 survivors x 64 dims: a steady RMS, a cheap test


def _config(rope):
    kw = dict(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=HEADS,
              num_hidden_layers=1, rope_parameters=ROPES[rope], max_position_embeddings=1 << 16)  # fmt: skip
    return Qwen2VLTextConfig(**kw) if rope == "mrope" else LlamaConfig(**kw)


def _rope(k, pos, inv, sections, scale, dtype):
    """The model's key: k [H, n, D] at positions pos [n, rows], angles and products in `dtype` precision's
    compute type (fp64 for the truth, fp32 like the model otherwise), one cast to `dtype` at the end."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if sections is None:
        ang = pos[:, 0].to(work)[:, None] * inv.to(work)
    else:
        row = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(sections)])
        ang = pos.to(work)[:, row] * inv.to(work)
    f = inv.numel()
    x = k.to(work)
    cos, sin = ang.cos() * scale, ang.sin() * scale
    x1, x2 = x[..., :f], x[..., f : 2 * f]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * f :]], -1).to(dtype)


def _fill_positions(rows, n):
    """n positions [n, rows]: text, and for M-RoPE 4x6 image blocks laid out like Qwen2-VL's get_rope_index."""
    out, p = [], 0
    while len(out) < n:
        if rows == 3 and len(out) % 40 == 10:
            out += [[p, p + i, p + j] for i in range(4) for j in range(6)]
            p += 6
        else:
            out.append([p] * rows)
            p += 1
    return torch.tensor(out[:n])


@pytest.mark.parametrize("rope,dtype", [(r, torch.bfloat16) for r in ROPES] + [(r, torch.float16) for r in
                                        ("default", "mrope")], ids=lambda x: str(x).replace("torch.", ""))  # fmt: skip
def test_keys_stay_one_rotation_from_exact_over_a_thousand_evictions(rope, dtype):
    cfg = _config(rope)
    inv, sections = inv_freq_from_config(cfg), mrope_section_of(cfg)
    scale = 1.0 if rope == "mrope" else LlamaRotaryEmbedding(cfg).attention_scaling
    cache = BoundedCache(CacheConfig(policy="streaming_llm", budget=FILL, recent=0, sinks=0, max_chunk=FILL,
                                     max_new_tokens=0), cfg, "cpu", dtype)  # fmt: skip
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(0)
    k = torch.randn(HEADS, FILL + EVICTIONS, HEAD_DIM, generator=g, dtype=torch.float64)
    v = torch.zeros(1, HEADS, 1, HEAD_DIM, dtype=dtype)

    def feed(ids, pos):  # pos [q, rows]: what the model does, without a model
        cache.begin_forward(pos.T, prefill=True)
        layer.update(_rope(k[:, ids], pos, inv, sections, scale, dtype)[None], v.expand(-1, -1, len(ids), -1))
        cache.end_chunk()

    feed(torch.arange(FILL), _fill_positions(cache.rows, FILL))
    for i in range(EVICTIONS):  # one new text token per chunk: the oldest stored token is evicted each time
        feed(torch.tensor([FILL + i]), torch.full((1, cache.rows), cache.next_position))
    assert cache.evictions == EVICTIONS
    survivors = layer.index[0, : cache.stored] < FILL  # survived every eviction (positions moved at each one)
    assert survivors.sum() == FILL - EVICTIONS
    idx, pos = layer.index[0, : cache.stored][survivors], layer.pos[0, : cache.stored][survivors]  # heads alike
    assert (layer.offset[0, : cache.stored][survivors] < -EVICTIONS // 2).all()  # they did move, a lot
    truth = _rope(k[:, idx], pos, inv, sections, scale, torch.float64)
    direct = _rope(k[:, idx], pos, inv, sections, scale, dtype)
    got = layer.current_keys()[:, survivors]

    def rms(x):
        return (x.double() - truth).pow(2).mean().sqrt().item()

    assert rms(got) <= 2 * rms(direct), (rms(got), rms(direct))
    # the old design: the stored key turned by each eviction's delta and cast back, 1000 times
    old, offset = layer.keys[0, :, : cache.stored][:, survivors], layer.offset[:, : cache.stored][:, survivors]
    for _ in range(EVICTIONS):
        old = rotate_keys_ref(old, torch.full(old.shape[:2], -1), inv)
    rest = offset + EVICTIONS  # the rest of each key's move (M-RoPE images: uneven)
    old = rotate_keys_ref(old, rest, inv, freq_rows_of(sections))
    assert rms(old) > 4 * rms(direct)


@torch.no_grad()
def test_bf16_session_over_500_evictions_matches_fp64_as_well_as_a_fresh_bf16_forward():
    """A 1-layer model (a token's K/V then depend only on the token and its position): 544 tokens, then 520 one-token
    chunks, each evicting the oldest token, so the first tokens kept moved at all 520 evictions. The last chunk's
    logits against an fp64 forward of the kept tokens at their positions + the chunk, compared with what a fresh
    bf16 forward of the same tokens gets."""
    model = tiny_lm("llama", layers=1, kv_heads=1).to(torch.bfloat16)
    budget, n_evict = 544, 520
    cache = BoundedCache(CacheConfig(policy="streaming_llm", budget=budget, recent=0, sinks=0, max_chunk=budget,
                                     max_new_tokens=0), model.config, "cpu", torch.bfloat16)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    fed = []
    for q in [budget] + [1] * n_evict:
        ids = torch.randint(0, VOCAB, (1, q), generator=g)
        kept, kept_pos = cache.kept_indices()[0, 0], cache.kept_positions()[0, 0]
        pos = (cache.next_position + torch.arange(q))[None]
        cache.begin_forward(pos, prefill=True)
        got = model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, **cache.forward_kwargs()).logits
        cache.end_chunk()
        fed.append(ids)
    assert cache.evictions == n_evict and kept[0] == n_evict - 1  # kept[:24] arrived first: moved 519 times
    ids = torch.cat([torch.cat(fed, 1)[0, kept], fed[-1][0]])[None]
    pos = torch.cat([kept_pos, pos[0]])[None]
    want = model.double()(input_ids=ids, position_ids=pos).logits[:, -1:]
    fresh = model.to(torch.bfloat16)(input_ids=ids, position_ids=pos).logits[:, -1:]
    err_got, err_fresh = (got.double() - want).abs().max().item(), (fresh.double() - want).abs().max().item()
    assert err_got <= 2 * err_fresh, (err_got, err_fresh)

"""Tiny fp32 text models and a streaming driver for the cache tests (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import sdpa_mask

from infmllm_ros import attention
from infmllm_ros.cache import BoundedCache, CacheConfig

VOCAB = 97


def tiny_lm(family="llama", layers=2, heads=4, kv_heads=2, seed=0, **extra):
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1 << 20,
        **extra,
    )
    cfg = LlamaConfig(**kw) if family == "llama" else Qwen2Config(**kw)
    model = (LlamaForCausalLM if family == "llama" else Qwen2ForCausalLM)(cfg).eval()
    attention.install(model)
    return model


def make_cache(model, read_copy=None, **cfg):
    return BoundedCache(CacheConfig(**cfg), model.config, "cpu", torch.float32, read_copy=read_copy)


@torch.no_grad()
def stream(model, cache, steps, record=None):
    """steps: list of (ids [1, q], prefill). Feeds each forward at cache.next_position; returns logits [1, N, V].
    record: list that receives, before every forward, the stream indices kept in the cache [layers, H, stored]."""
    outs = []
    for ids, prefill in steps:
        if record is not None:
            record.append(cache.kept_indices().clone())
        q = ids.shape[1]
        pos = (cache.next_position + torch.arange(q))[None]
        cache.begin_forward(pos, prefill=prefill)
        outs.append(model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True,
                          **cache.forward_kwargs()).logits)  # fmt: skip
        if prefill:
            cache.end_chunk()
    return torch.cat(outs, 1) if outs else None


def script(chunks=(10, 7, 12, 9), decode=2, seed=1):
    """A stream: prefill chunks of the given sizes, each followed by `decode` single-token steps."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for c in chunks:
        steps.append((torch.randint(0, VOCAB, (1, c), generator=g), True))
        steps += [(torch.randint(0, VOCAB, (1, 1), generator=g), False) for _ in range(decode)]
    return steps


def all_ids(steps):
    return torch.cat([ids for ids, _ in steps], 1)


# ---- oracle: a full forward where each layer/head's queries see only what the cache held -----------------------
_VISIBLE: dict[int, torch.Tensor] = {}


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with a per-layer, per-KV-head visibility [H_kv, N, N] (True = attend). Plain torch."""
    g = query.shape[1] // key.shape[1]
    vis = _VISIBLE[module.layer_idx].repeat_interleave(g, 0)[None]
    k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    logits = (query @ k.transpose(-1, -2)) * scaling
    probs = logits.masked_fill(~vis, float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2).contiguous(), None


def visibility(steps, record, n_layers, heads):
    """[layers][H, N, N]: a query of forward f sees what the cache kept before f, plus its own forward causally."""
    n = sum(ids.shape[1] for ids, _ in steps)
    vis = torch.zeros(n_layers, heads, n, n, dtype=torch.bool)
    start = 0
    for (ids, _), kept in zip(steps, record, strict=True):
        q = ids.shape[1]
        for li in range(n_layers):
            for h in range(heads):
                vis[li, h, start : start + q, kept[li, h]] = True
        vis[:, :, start : start + q, start : start + q] = torch.ones(q, q, dtype=torch.bool).tril()
        start += q
    return vis


@torch.no_grad()
def oracle_forward(model, ids, vis, positions=None):
    """One full forward of ids with the per-layer/head visibility (absolute positions unless given)."""
    AttentionInterface.register("cache_test_oracle", _oracle_attention)
    AttentionMaskInterface.register("cache_test_oracle", sdpa_mask)
    old = model.config._attn_implementation
    model.set_attn_implementation("cache_test_oracle")
    _VISIBLE.clear()
    _VISIBLE.update({i: vis[i] for i in range(vis.shape[0])})
    try:
        return model(input_ids=ids, position_ids=positions, use_cache=False).logits
    finally:
        model.set_attn_implementation(old)


def layer0_qk(model, ids, pos):
    """Layer 0's rotated queries and keys of tiny_lm (4 query heads, 2 KV heads, head_dim 16), computed by hand."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn, layer = model.model.layers[0].self_attn, model.model.layers[0]
    with torch.no_grad():
        h = layer.input_layernorm(model.model.embed_tokens(ids))
        q = attn.q_proj(h).view(1, ids.shape[1], 4, 16).transpose(1, 2)
        k = attn.k_proj(h).view(1, ids.shape[1], 2, 16).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, pos)
        return apply_rotary_pos_emb(q, k, cos, sin)


def qwen2vl_rope(x, pos, text_config, dtype=torch.float64):
    """Qwen2-VL's own M-RoPE applied to unrotated keys x [H, n, D] at 3-row positions pos [H, n, 3] (or [n, 3]),
    computed in `dtype`: the model's inv_freq and attention_scaling, its section layout
    (Qwen2VLRotaryEmbedding.recomposition_frequencies) and its apply_rotary_pos_emb. fp64 = the truth; fp32 with
    `emb.forward` is what the model itself computes (see qwen2vl_rope_model)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    emb = Qwen2VLRotaryEmbedding(text_config)
    pos = pos.expand(x.shape[0], -1, -1) if pos.dim() == 2 else pos
    freqs = pos.permute(2, 0, 1).to(dtype)[..., None] * emb.inv_freq.to(dtype)  # [3, H, n, F]
    cos = emb.recomposition_frequencies(freqs.cos() * emb.attention_scaling)  # [H, n, D]
    sin = emb.recomposition_frequencies(freqs.sin() * emb.attention_scaling)
    xd = x.to(dtype)[:, None]  # heads as the batch: every head has its own positions
    _, k = apply_rotary_pos_emb(xd, xd, cos, sin)
    return k[:, 0]


def qwen2vl_rope_model(x, pos, text_config):
    """What the model computes (fp32 cos/sin from Qwen2VLRotaryEmbedding.forward, cast to x's dtype) at pos [n, 3]."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    cos, sin = Qwen2VLRotaryEmbedding(text_config)(x, pos.T[:, None])  # position_ids [3, 1, n]
    _, k = apply_rotary_pos_emb(x[None], x[None], cos, sin)
    return k[0]

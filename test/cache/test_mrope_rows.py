"""M-RoPE rows that move apart (issue 12 item 4, the bound's fallback): when the span squeeze would leave more than
`budget` positions, each position row is squeezed alone, so a key's t, h and w rows move by different deltas and
each rotary section must turn by its own row's offset. Oracles: Qwen2-VL's own rotary embedding applied directly at
the target positions in fp64, and a fresh forward of the kept tokens at their new positions."""

import pytest
import torch
from cache_helpers import make_cache, qwen2vl_rope, qwen2vl_rope_model
from infmllm_ros.kernels import rotate_keys_ref
from transformers import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

from infmllm_ros import attention
from infmllm_ros.cache.rope import freq_rows_of, inv_freq_from_config, mrope_section_of


def _text_config(sections=(8, 12, 12), heads=4, kv_heads=2, layers=1):
    head_dim = 2 * sum(sections)
    return Qwen2VLTextConfig(vocab_size=97, hidden_size=heads * head_dim, intermediate_size=128,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             max_position_embeddings=4096,
                             rope_parameters={"rope_type": "default", "mrope_section": list(sections),
                                              "rope_theta": 1e4})  # fmt: skip


@pytest.mark.parametrize("sections", [(8, 12, 12), (2, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotate_keys_per_row_offsets_equal_the_models_rotary_at_the_target_positions(sections, dtype):
    cfg = _text_config(sections)
    inv, rows = inv_freq_from_config(cfg), freq_rows_of(mrope_section_of(cfg))
    g = torch.Generator().manual_seed(0)
    heads, n, d = 2, 40, 2 * sum(sections)
    x = torch.randn(heads, n, d, generator=g, dtype=torch.float64)  # unrotated keys
    start = torch.randint(0, 600, (n, 3), generator=g)  # where the model rotated them
    delta = -torch.randint(0, 500, (heads, n, 3), generator=g)  # every row of every head moves its own way
    stored = torch.stack([qwen2vl_rope_model(x[h : h + 1].to(dtype), start, cfg)[0] for h in range(heads)])
    target = start + delta
    truth = qwen2vl_rope(x, target, cfg)  # fp64, the model's layout and formula
    direct = torch.stack([qwen2vl_rope_model(x[h : h + 1].to(dtype), target[h], cfg)[0] for h in range(heads)])
    got = rotate_keys_ref(stored, delta, inv, rows)

    def err(k):
        return (k.double() - truth).abs().max().item()

    if dtype == torch.float32:  # the stored key's and the turn's fp32 angles (positions < 1100) both carry rounding
        assert err(got) < 3e-4, (err(got), err(direct))
    else:  # 16-bit: one rounding of the result dominates, as for the model's own key at the target
        assert err(got) <= 2 * err(direct), (err(got), err(direct))
    # it can fail: turning every section by one row's delta (what a plain [H, n] offset would do) is far off
    assert err(rotate_keys_ref(stored, delta[..., 0], inv)) > 0.1
    assert err(rotate_keys_ref(stored, delta[..., [1, 2, 0]], inv, rows)) > 0.1  # rows swapped


def _model(kv_heads=1, layers=1, sections=(2, 3, 3)):
    torch.manual_seed(0)
    model = Qwen2VLTextModel(_text_config(sections, kv_heads=kv_heads, layers=layers)).eval()
    attention.install(model)
    return model


def _wide_chunk(start, width, tall, g, n_text=2):
    """ids and [3, q] positions: text, a 1 x width (or width x 1 when tall) image laid out like get_rope_index, text.
    Its last image token spans `width` positions (h or w row), so a few kept ones cover many positions."""
    rows, p = [[start + i] * 3 for i in range(n_text)], start + n_text
    rows += [[p, p + i, p] if tall else [p, p, p + i] for i in range(width)]
    rows.append([p + width] * 3)
    pos = torch.tensor(rows).T
    return torch.randint(0, 97, (1, pos.shape[1]), generator=g), pos


@torch.no_grad()
def _feed(model, cache, ids, pos):
    cache.begin_forward(pos[:, None], prefill=True)
    out = model(input_ids=ids, position_ids=pos[:, None], cache=cache, use_cache=True, **cache.forward_kwargs())
    cache.end_chunk()
    return out.last_hidden_state


@pytest.mark.parametrize("policy", ["streaming_llm", "saddle"])
def test_after_a_row_by_row_squeeze_the_stream_equals_a_fresh_forward_of_the_kept_tokens(policy):
    """1 layer, 1 KV head (a token's K/V depend only on the token and its positions): after evictions that fell back
    to the row-by-row squeeze, the next chunk's output equals a fresh forward of the kept tokens at the cache's new
    3-row positions (rows that moved apart) followed by the chunk."""
    model = _model()
    cache = make_cache(model, policy=policy, budget=6, recent=2, sinks=1, bias="none", window=0, max_chunk=16,
                       max_new_tokens=0)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    fed_ids, fed_pos = [], []
    for c in range(8):
        ids, pos = _wide_chunk(cache.next_position, 10 + c % 3, c % 2 == 1, g)
        if c == 7:
            kept = cache.kept_indices()[0, 0]
            kept_pos = torch.stack([cache.kept_positions(r)[0, 0] for r in range(3)])  # [3, stored]
        got = _feed(model, cache, ids, pos)
        fed_ids.append(ids)
        fed_pos.append(pos)
        assert cache.next_position <= cache.config.budget  # the proven bound, after every eviction
    assert cache.row_squeezes >= 3, cache.row_squeezes
    moved = kept_pos - torch.cat(fed_pos, 1)[:, kept]
    assert (moved != moved[:1]).any()  # some kept token's rows moved by different deltas
    ids = torch.cat([torch.cat(fed_ids, 1)[:, kept], fed_ids[-1]], 1)
    pos = torch.cat([kept_pos, fed_pos[-1]], 1)
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=pos[:, None]).last_hidden_state[:, kept.numel() :]
    assert (got - want).abs().max().item() < 1e-5
    # ... and it can fail: the same tokens at the positions they arrived with (rows not moved apart) differ
    old = torch.cat([torch.cat(fed_pos, 1)[:, kept], fed_pos[-1]], 1)
    with torch.no_grad():
        other = model(input_ids=ids, position_ids=old[:, None]).last_hidden_state[:, kept.numel() :]
    assert (got - other).abs().max().item() > 1e-4


@torch.no_grad()
def test_attention_logits_after_a_row_by_row_squeeze_equal_fresh_fp64_logits_per_head():
    """2 layers, 2 KV heads keeping different tokens (saddle, per head): layer 0's keys as attention reads them and
    the logits of a new query against them equal the model's projections rotated directly, in fp64, at each head's
    new 3-row positions."""
    model = _model(kv_heads=2, layers=2, sections=(8, 12, 12))
    cache = make_cache(model, policy="saddle", budget=6, recent=1, sinks=0, bias="none", window=0, max_chunk=16,
                       max_new_tokens=0)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    fed = []
    for c in range(6):
        ids, _pos = _wide_chunk(cache.next_position, 11, c % 2 == 0, g)
        _feed(model, cache, ids, _pos)
        fed.append(ids)
    assert cache.row_squeezes >= 1
    index = cache.kept_indices()[0]  # [2, stored]
    new_pos = torch.stack([cache.kept_positions(r)[0] for r in range(3)], -1)  # [2, stored, 3]
    assert not torch.equal(index[0], index[1])  # per-head selection
    ids = torch.cat(fed, 1)
    layer0, attn = model.layers[0], model.layers[0].self_attn
    hidden = layer0.input_layernorm(model.embed_tokens(ids)).double()
    d = attn.head_dim
    k = (hidden @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()).view(-1, 2, d).transpose(0, 1)
    want_k = qwen2vl_rope(k.gather(1, index[..., None].expand(-1, -1, d)), new_pos, model.config)
    got_k = cache.layers[0].current_keys()
    assert (got_k.double() - want_k).abs().max().item() < 1e-5
    # a query of the next chunk (a text token at next_position on every row) against those keys, per KV head
    q_ids = torch.randint(0, 97, (1, 1), generator=g)
    hq = layer0.input_layernorm(model.embed_tokens(q_ids)).double()
    q = (hq @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()).view(-1, 4, d).transpose(0, 1)  # [4, 1, d]
    q = qwen2vl_rope(q, torch.full((1, 3), cache.next_position), model.config)
    kv_of_q = torch.arange(4) // 2
    got = torch.einsum("hqd,hnd->hqn", q.float(), got_k[kv_of_q]) * attn.scaling
    want = torch.einsum("hqd,hnd->hqn", q, want_k[kv_of_q]) * attn.scaling
    assert (got.double() - want).abs().max().item() < 1e-4

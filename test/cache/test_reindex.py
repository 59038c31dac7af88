"""Check of truth 3 (part 2): reindex mode after eviction == a fresh forward over just the kept tokens at their new
positions. Exact for a 1-layer model (a token's K/V then depend only on the token and its position); for deeper
models the layer-0 keys as attention reads them are checked against the model's projection + rotary at the new
positions."""

import pytest
import torch
from cache_helpers import make_cache, oracle_forward, script, stream, tiny_lm, visibility
from transformers import Qwen2VLTextConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

from infmllm_ros import attention


@pytest.mark.parametrize("policy,kv_heads", [("streaming_llm", 2), ("saddle", 1), ("h2o", 1)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reindexed_stream_equals_fresh_forward_of_kept_tokens(family, policy, kv_heads):
    model = tiny_lm(family, layers=1, kv_heads=kv_heads)
    steps = script(chunks=(12, 9, 14, 8), decode=2)
    cache = make_cache(model, policy=policy, budget=10, recent=3, window=5, sinks=1, positions="reindex",
                       max_chunk=16, max_new_tokens=4)  # fmt: skip
    stream(model, cache, steps[:-3])
    kept = cache.kept_indices()[0, 0]
    assert (cache.kept_indices() == kept).all()  # one set (1 KV head, or StreamingLLM)
    assert cache.kept_positions()[0, 0].tolist() == list(range(cache.stored))  # squeezed to 0..stored-1
    assert cache.next_position == cache.stored < cache.seen
    tail = steps[-3:-2]  # the next chunk (its end_chunk evicts again, so the decodes after it see less)
    got = stream(model, cache, tail)
    ids = torch.cat([torch.cat([i for i, _ in steps], 1)[:, kept]] + [i for i, _ in tail], 1)
    with torch.no_grad():
        want = model(input_ids=ids).logits[:, kept.numel() :]  # positions 0..len-1
    assert (got - want).abs().max().item() < 1e-5
    assert cache.next_position <= cache.config.capacity


def test_layer0_keys_are_the_kept_tokens_rotated_at_their_new_positions():
    model = tiny_lm("qwen2", layers=2, kv_heads=2)  # Qwen2: k_proj has a bias
    steps = script(chunks=(12, 9, 14, 8), decode=2)
    cache = make_cache(model, policy="saddle", budget=10, recent=2, window=5, positions="reindex", max_chunk=16,
                       max_new_tokens=4, bias="none")  # fmt: skip
    stream(model, cache, steps)
    ids = torch.cat([i for i, _ in steps], 1)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k = attn.k_proj(h).view(1, ids.shape[1], 2, 16).transpose(1, 2)[0]  # [H, N, D] before RoPE
        v = attn.v_proj(h).view(1, ids.shape[1], 2, 16).transpose(1, 2)[0]
    index, pos = cache.kept_indices()[0], cache.kept_positions()[0]
    assert not torch.equal(index[0], index[1])  # per-head selection happened (same count)
    layer = cache.layers[0]
    for hd in range(2):
        cos, sin = model.model.rotary_emb(k, pos[hd][None])
        _, want = apply_rotary_pos_emb(k[None, hd : hd + 1, index[hd]], k[None, hd : hd + 1, index[hd]], cos, sin)
        assert (layer.current_keys()[hd] - want[0, 0]).abs().max().item() < 1e-5  # as attention reads them
        assert (layer.values[0, hd, : cache.stored] - v[hd, index[hd]]).abs().max().item() < 1e-6


def _mrope_text_model(layers=1):
    torch.manual_seed(0)
    cfg = Qwen2VLTextConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
    )
    model = Qwen2VLTextModel(cfg).eval()
    attention.install(model)
    return model


def _mrope_chunk(start, n_text=3, grid=(2, 3), seed=0):
    """ids and 3-row positions of: text, an image block laid out like Qwen2-VL's get_rope_index, text."""
    g = torch.Generator().manual_seed(seed)
    rows = [[start + i] * 3 for i in range(n_text)]
    p = start + n_text
    rows += [[p, p + i, p + j] for i in range(grid[0]) for j in range(grid[1])]
    p += max(grid)
    rows += [[p + i] * 3 for i in range(n_text)]
    pos = torch.tensor(rows).T  # [3, q]
    return torch.randint(0, 97, (1, pos.shape[1]), generator=g), pos


@torch.no_grad()
def _feed(model, cache, ids, pos, prefill=True):
    cache.begin_forward(pos[:, None], prefill=prefill)
    out = model(input_ids=ids, position_ids=pos[:, None], cache=cache, use_cache=True, **cache.forward_kwargs())
    if prefill:
        cache.end_chunk()
    return out.last_hidden_state


@pytest.mark.parametrize("budget", [100, 14, 19])  # 19 keeps part of an image
def test_mrope_stream(budget):
    """budget >= stream: equals the full forward; with eviction: equals a fresh forward of the kept tokens at the
    cache's new 3-row positions, and each kept image keeps its internal t/h/w layout."""
    model = _mrope_text_model()
    cache = make_cache(model, policy="streaming_llm", budget=budget, sinks=2, recent=0, positions="reindex",
                       max_chunk=16, max_new_tokens=2)  # fmt: skip
    all_ids, all_pos, outs = [], [], []
    for c in range(4):
        ids, pos = _mrope_chunk(cache.next_position, seed=c)
        if c == 3:
            kept_ids = torch.cat(all_ids, 1)[:, cache.kept_indices()[0, 0]]
            kept_pos = torch.stack([cache.kept_positions(r)[0, 0] for r in range(3)])
            before = torch.stack([p for p in torch.cat(all_pos, 1).T])[cache.kept_indices()[0, 0]].T
            assert torch.equal(kept_pos - kept_pos[0], before - before[0])  # every row moved by the same delta
        outs.append(_feed(model, cache, ids, pos))
        all_ids.append(ids)
        all_pos.append(pos)
    got = torch.cat(outs, 1)
    if budget >= 100:
        want = model(input_ids=torch.cat(all_ids, 1), position_ids=torch.cat(all_pos, 1)[:, None]).last_hidden_state
        assert cache.evictions == 0
    else:
        assert cache.evictions >= 2
        ids = torch.cat([kept_ids, all_ids[-1]], 1)
        pos = torch.cat([kept_pos, all_pos[-1]], 1)
        want = model(input_ids=ids, position_ids=pos[:, None]).last_hidden_state[:, kept_ids.shape[1] :]
        got = outs[-1]
        assert cache.next_position <= budget + 16
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_evicting_one_token_changes_only_what_it_should(family):
    """Evict exactly one token (the first): queries before the eviction are untouched, later queries equal a full
    forward that hides just that token. In reindex mode every kept key moves by the same delta (-1), so the
    re-rotation must be invisible: the result equals the absolute-position oracle (kv_cache_peers A.8: eviction
    mechanics must not fail like a cliff)."""
    model = tiny_lm(family)
    steps = script(chunks=(10, 5, 5), decode=0)
    cache = make_cache(model, policy="streaming_llm", budget=14, recent=0, sinks=0, positions="reindex",
                       max_chunk=16, max_new_tokens=0)  # fmt: skip
    record = []
    got = stream(model, cache, steps, record)
    assert cache.evictions == 2  # after chunk 2: token 0 only; after chunk 3 (not seen by any query here): 5 more
    ids = torch.cat([i for i, _ in steps], 1)
    with torch.no_grad():
        full = model(input_ids=ids).logits
    assert (got[:, :15] - full[:, :15]).abs().max().item() < 1e-5  # before the eviction: unchanged
    vis = visibility(steps, record, 2, 2)
    assert vis[0, 0, 15:, 0].sum() == 0 and vis[0, 0, 15:, 1:].any()  # only token 0 hidden from chunk 3
    want = oracle_forward(model, ids, vis)
    assert (got - want).abs().max().item() < 1e-5
    assert (got[:, 15:] - full[:, 15:]).abs().max().item() > 1e-4  # and it did matter

"""Bounded positions (issue 12 item 4): in reindex mode next_position <= budget after every eviction, hence
<= budget + max_chunk + max_new_tokens at every forward, for 1-D RoPE and Qwen2-VL M-RoPE, every evicting policy and
bias, over 1000 chunks of mixed images and text with decoded tokens between them. Driven at the cache level with
random scores (the bound must hold whatever the scores pick, per KV head) and with adversarial ones: M-RoPE images
of a wide h or w extent, each keeping its widest token, so the span squeeze alone would leave far more positions
than the budget and the row-by-row fallback must fire."""

import pytest
import torch
from transformers import LlamaConfig, Qwen2VLTextConfig

from infmllm_ros.cache import BoundedCache, CacheConfig

CONFIGS = [("saddle", "none"), ("saddle", "linear"), ("saddle", "age_decay"), ("h2o", "none"),
           ("streaming_llm", "none")]  # fmt: skip
BUDGET, MAX_CHUNK, MAX_NEW, CHUNKS = 48, 42, 4, 1000  # a chunk: <= 5 text + a 6x6 image + 1


def _model_config(mrope):
    kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    if mrope:
        return Qwen2VLTextConfig(**kw, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                        "rope_theta": 1e4})  # fmt: skip
    return LlamaConfig(**kw)


def _chunk(g, start, rows):
    """[rows, q] positions of text + (half the time) an image laid out like Qwen2-VL's get_rope_index + text."""
    out, p = [], start
    for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
        out.append([p] * rows)
        p += 1
    if torch.rand(1, generator=g) < 0.5:
        gh, gw = (int(x) for x in torch.randint(1, 7, (2,), generator=g))
        if rows == 3:
            out += [[p, p + i, p + j] for i in range(gh) for j in range(gw)]
            p += max(gh, gw)
        else:
            out += [[p + i] for i in range(gh * gw)]
            p += gh * gw
        out.append([p] * rows)
    return torch.tensor(out).T


@pytest.mark.parametrize("mrope", [False, True], ids=["rope1d", "mrope"])
@pytest.mark.parametrize("policy,bias", CONFIGS)
def test_next_position_stays_bounded_over_a_thousand_chunks(policy, bias, mrope):
    cfg = CacheConfig(policy=policy, budget=BUDGET, recent=8, window=8, sinks=2, bias=bias, max_chunk=MAX_CHUNK,
                      max_new_tokens=MAX_NEW)  # fmt: skip
    cache = BoundedCache(cfg, _model_config(mrope))
    bound = BUDGET + MAX_CHUNK + MAX_NEW
    g = torch.Generator().manual_seed(0)
    worst = 0

    def forward(pos, prefill):
        nonlocal worst
        cache.begin_forward(pos, prefill=prefill)
        q = pos.shape[1]
        for layer in cache.layers:
            layer.update(torch.zeros(1, 2, q, 16), torch.zeros(1, 2, q, 16))
            if cache.policy.scores == "every_step" or (cache.policy.scores == "window" and prefill):
                layer.record_scores(torch.rand(2, layer.stored, generator=g), cache.policy.scores)
        worst = max(worst, cache.next_position)
        assert cache.next_position <= bound

    for _ in range(CHUNKS):
        forward(_chunk(g, cache.next_position, cache.rows), True)
        evictions = cache.evictions
        cache.end_chunk()
        if cache.evictions > evictions:
            assert cache.next_position <= BUDGET  # the proof's step: every eviction squeezes to <= budget
        for _ in range(int(torch.randint(0, MAX_NEW + 1, (1,), generator=g))):
            forward(torch.full((cache.rows, 1), cache.next_position), False)
    assert cache.evictions > CHUNKS // 2 and cache.seen > 10 * BUDGET
    print(
        f"{policy}/{bias} {'mrope' if mrope else '1d'}: worst next_position {worst} (bound {bound}), "
        f"{cache.row_squeezes} row-by-row squeezes"
    )


WIDE_BUDGET, WIDE_CHUNK, WIDE_MAX = 8, 29, 24  # a chunk: <= 4 text + an image of <= 24 tokens + 1


def _wide_chunk(g, start):
    """[3, q] positions and per-token worth: text, then (3 chunks in 4) an image that is 1 x w, h x 1 or (rarely)
    h x w, laid out like get_rope_index, then text. The image's widest token (it spans the whole h or w extent)
    is worth 10 + its extent, every other token < 1: a scored policy keeps one wide token from each image."""
    out, worth, p = [], [], start
    for _ in range(int(torch.randint(0, 5, (1,), generator=g))):
        out.append([p] * 3)
        p += 1
    kind = int(torch.randint(0, 8, (1,), generator=g))
    if kind < 6:
        side = int(torch.randint(2, WIDE_MAX + 1, (1,), generator=g))
        gh, gw = (side, 1) if kind % 2 else (1, side)
        if kind >= 4:  # a 2-D image now and then
            gh, gw = int(torch.randint(2, 5, (1,), generator=g)), int(torch.randint(2, 7, (1,), generator=g))
        out += [[p, p + i, p + j] for i in range(gh) for j in range(gw)]
        p += max(gh, gw)
    out.append([p] * 3)
    pos = torch.tensor(out).T
    worth = torch.rand(pos.shape[1], generator=g)
    span = pos.max(0).values - pos.min(0).values
    if span.max() > 0:
        worth[span.argmax()] = 10.0 + span.max()
    return pos, worth


@pytest.mark.parametrize("policy,bias", CONFIGS)
def test_wide_mrope_images_fall_back_to_the_row_squeeze_and_stay_bounded(policy, bias):
    cfg = CacheConfig(policy=policy, budget=WIDE_BUDGET, recent=2, window=0, sinks=1, bias=bias,
                      max_chunk=WIDE_CHUNK, max_new_tokens=MAX_NEW)  # fmt: skip
    cache = BoundedCache(cfg, _model_config(True))
    bound = WIDE_BUDGET + WIDE_CHUNK + MAX_NEW
    g = torch.Generator().manual_seed(1)
    worth = torch.zeros(0)  # per stream index
    worst = 0

    def forward(pos, prefill):
        nonlocal worst
        cache.begin_forward(pos, prefill=prefill)
        q = pos.shape[1]
        for layer in cache.layers:
            layer.update(torch.zeros(1, 2, q, 16), torch.zeros(1, 2, q, 16))
            if cache.policy.scores == "every_step" or (cache.policy.scores == "window" and prefill):
                scores = worth[layer.index[:, : layer.stored]] + 1e-3 * torch.rand(2, layer.stored, generator=g)
                layer.record_scores(scores, cache.policy.scores)
        worst = max(worst, cache.next_position)
        assert cache.next_position <= bound

    for _ in range(CHUNKS):
        pos, w = _wide_chunk(g, cache.next_position)
        worth = torch.cat([worth, w])
        forward(pos, True)
        evictions = cache.evictions
        cache.end_chunk()
        if cache.evictions > evictions:
            assert cache.next_position <= WIDE_BUDGET
        for _ in range(int(torch.randint(0, MAX_NEW + 1, (1,), generator=g))):
            worth = torch.cat([worth, torch.rand(1, generator=g)])
            forward(torch.full((3, 1), cache.next_position), False)
    assert cache.evictions > CHUNKS // 2
    assert cache.row_squeezes > CHUNKS // 10, cache.row_squeezes  # the span squeeze alone would break the bound
    print(
        f"wide {policy}/{bias}: worst next_position {worst} (bound {bound}), {cache.row_squeezes} row squeezes "
        f"in {cache.evictions} evictions"
    )

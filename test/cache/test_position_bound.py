"""Bounded positions (issue 12 item 4): in reindex mode next_position <= budget + max_chunk + max_new_tokens at every
forward, for 1-D RoPE and Qwen2-VL M-RoPE, every evicting policy and bias, over 1000 chunks of mixed images and
text with decoded tokens between them. Driven at the cache level with random scores: the bound must hold whatever
the scores pick (per KV head, so heads keep different tokens)."""

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
        cache.end_chunk()
        for _ in range(int(torch.randint(0, MAX_NEW + 1, (1,), generator=g))):
            forward(torch.full((cache.rows, 1), cache.next_position), False)
    assert cache.evictions > CHUNKS // 2 and cache.seen > 10 * BUDGET
    print(f"{policy}/{bias} {'mrope' if mrope else '1d'}: worst next_position {worst} (bound {bound})")

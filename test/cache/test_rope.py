"""Check of truth 3 (part 1): re-rotated keys == keys rotated at the new positions, against transformers' own
rotary embeddings (plain RoPE, scaled RoPE whose cos/sin carry attention_scaling, Qwen2-VL M-RoPE sections)."""

import pytest
import torch
from transformers import LlamaConfig, Qwen2VLTextConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

from infmllm_ros.cache.rope import inv_freq_from_config, mrope_section_of, rerotate

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
}  # fmt: skip


def hf_rotate(rotary, k, pos):
    """k [H, n, D] rotated by the model's own rotary module at positions pos ([n] or [3, n])."""
    cos, sin = rotary(k, pos[None] if pos.dim() == 1 else pos[:, None])
    _, out = apply_rotary_pos_emb(k[None], k[None], cos, sin)
    return out[0]


@pytest.mark.parametrize("rope", ROPES)
def test_plain_rerotation_matches_model_rotary(rope):
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_parameters=ROPES[rope],
                      max_position_embeddings=256)  # fmt: skip
    rotary = LlamaRotaryEmbedding(cfg)
    inv = inv_freq_from_config(cfg)
    assert torch.equal(inv, rotary.inv_freq)
    torch.manual_seed(0)
    k = torch.randn(2, 9, 16)
    old = torch.tensor([0, 3, 7, 40, 41, 90, 100, 150, 200])
    delta = torch.tensor([[0, -3, -5, -30, -30, -70, -71, -100, -150], [5, 2, 1, 0, -1, -2, -3, -4, -5]])
    for h in range(2):
        at_old = hf_rotate(rotary, k[h : h + 1], old)
        at_new = hf_rotate(rotary, k[h : h + 1], old + delta[h])
        got = rerotate(at_old, delta[h : h + 1], inv)
        assert (got - at_new).abs().max().item() < 2e-5
    if rotary.attention_scaling != 1.0:  # composing the model's cos/sin would scale twice
        cos, sin = rotary(k, delta[:1])
        _, twice = apply_rotary_pos_emb(at_old[None], at_old[None], cos, sin)
        assert (twice[0] - at_new).abs().max().item() > 1e-2


def test_mrope_rerotation_per_section():
    cfg = Qwen2VLTextConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
    )
    rotary = Qwen2VLRotaryEmbedding(cfg)
    sections = mrope_section_of(cfg)
    inv = inv_freq_from_config(cfg)
    assert sections == [2, 3, 3] and torch.equal(inv, rotary.inv_freq)
    torch.manual_seed(1)
    k = torch.randn(1, 6, 16)
    old = torch.tensor([[5, 5, 5, 5, 9, 10], [5, 5, 6, 6, 9, 10], [5, 6, 5, 6, 9, 10]])  # t/h/w rows: a 2x2 image
    at_old = hf_rotate(rotary, k, old)
    for delta in ([-3, -3, -3], [-3, 1, 7], [0, 0, 4]):  # same delta in every row, and different deltas per row
        d = torch.tensor(delta)[:, None].expand(3, 6)
        want = hf_rotate(rotary, k, old + d)
        got = rerotate(at_old, d.T[None], inv, sections)
        assert (got - want).abs().max().item() < 2e-5
        if len(set(delta)) == 1:  # all rows alike: the plain rotation is the same thing
            assert (rerotate(at_old, d[0][None], inv) - want).abs().max().item() < 2e-5
    wrong = rerotate(at_old, torch.tensor([-3, 1, 7]).expand(6, 3)[None], inv, [3, 3, 2])
    assert (wrong - hf_rotate(rotary, k, old + torch.tensor([-3, 1, 7])[:, None])).abs().max().item() > 1e-3

"""RoPE re-rotation of stored keys, from the text config's rope parameters (fp32).

Why not the model's cos/sin: they already carry `attention_scaling` (YaRN, longrope), so composing them would scale
the key twice. A rotation by delta only needs inv_freq. Convention: HF `rotate_half` (first half / second half of the
rotary dims); dims past the rotary ones (partial rotary) pass through.
"""

from __future__ import annotations

import torch


def text_config_of(config):
    """The language model's config of a VLM config (or the config itself for a text model)."""
    if hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    return config


def rope_parameters(text_config) -> dict:
    params = getattr(text_config, "rope_parameters", None) or {}
    if not params and getattr(text_config, "rope_theta", None) is not None:  # older configs
        params = {"rope_type": "default", "rope_theta": text_config.rope_theta}
    return dict(params)


def head_dim_of(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def inv_freq_from_config(text_config, device=None) -> torch.Tensor:
    """fp32 inverse frequencies [rotary_dim / 2], exactly as the model's rotary embedding computes them."""
    params = rope_parameters(text_config)
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, _attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](text_config, device)
        return inv_freq.to(device=device, dtype=torch.float32)
    base = params["rope_theta"]
    factor = params.get("partial_rotary_factor", getattr(text_config, "partial_rotary_factor", 1.0)) or 1.0
    dim = int(head_dim_of(text_config) * factor)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def mrope_section_of(text_config) -> list[int] | None:
    """Qwen2-VL style M-RoPE sections (frequencies per t/h/w row), or None for plain RoPE."""
    section = rope_parameters(text_config).get("mrope_section")
    return list(section) if section else None


def freq_rows_of(sections: list[int] | None, device=None) -> torch.Tensor | None:
    """[F] long: the M-RoPE position row (0 t, 1 h, 2 w) each rotary frequency turns by (section i reads row i % 3,
    as Qwen2VLRotaryEmbedding.recomposition_frequencies lays them out); None for plain RoPE."""
    if not sections:
        return None
    return torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(sections)]).to(device)


def _angles(delta: torch.Tensor, inv_freq: torch.Tensor, sections: list[int] | None) -> torch.Tensor:
    """Angles [..., n, F] fp32. sections=None: delta [..., n] turns every frequency alike (also right for M-RoPE
    when all rows move together). sections given: delta [..., n, 3], frequency f of section s reads row s % 3
    (Qwen2VLRotaryEmbedding.recomposition_frequencies)."""
    inv_freq = inv_freq.to(device=delta.device, dtype=torch.float32)
    if sections is None:
        return delta.to(torch.float32)[..., None] * inv_freq
    if sum(sections) != inv_freq.numel() or delta.shape[-1] != 3:
        raise ValueError(f"M-RoPE: sections {sections} must sum to {inv_freq.numel()} and delta end in 3 rows")
    return delta.to(torch.float32)[..., freq_rows_of(sections, delta.device)] * inv_freq


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., n, D] by angles [..., n, F] (rotate_half convention), computed in fp32, cast back."""
    f = angles.shape[-1]
    xf = x.to(torch.float32)
    x1, x2, rest = xf[..., :f], xf[..., f : 2 * f], xf[..., 2 * f :]
    cos, sin = angles.cos(), angles.sin()
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    return out.to(x.dtype)


def apply_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, sections=None) -> torch.Tensor:
    """RoPE at positions: x [..., n, D]; pos [..., n] (plain) or [..., n, 3] with sections (M-RoPE rows t/h/w)."""
    return rotate(x, _angles(pos, inv_freq, sections))


def rerotate(k: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, sections=None) -> torch.Tensor:
    """Keys rotated at p -> keys rotated at p + delta. delta [..., n], or [..., n, 3] per M-RoPE row with sections."""
    return rotate(k, _angles(delta, inv_freq, sections))

"""The Inf-MLLM attention function: SDPA output + the eviction scores the cache's policy needs.

`install(model)` registers the function and its mask function (without the mask registration transformers hands
attention_mask=None to a custom name, and SDPA then slices the keys: silently wrong chunked prefill), then switches
ONLY the language model to it. The cache is not an argument of attention functions: it arrives through the extra
forward kwarg that `cache.forward_kwargs()` returns, which transformers threads down to every attention call.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .cache.bounded import FORWARD_KWARG

NAME = "infmllm"


def infmllm_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs):  # fmt: skip
    """query [B, H_q, q, D]; key/value [B, H_kv, stored + q, D] (the cache already appended this forward)."""
    cache = kwargs.pop(FORWARD_KWARG, None)
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    **kwargs)  # fmt: skip
    if cache is not None and getattr(module, "layer_idx", None) is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        cache.after_attention(module.layer_idx, query, key, scale)
        probe = getattr(cache, "attention_probe", None)  # memory view: a question's attention mass (evidence)
        if probe is not None:
            probe(module.layer_idx, query, key, scale)
    return out, None


def register() -> str:
    AttentionInterface.register(NAME, infmllm_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def _check_positions(module, args, kwargs):
    """Forward pre-hook on the text model: a forward through the cache must carry begin_forward's positions.
    (Checked here, not in the attention: Qwen2-VL hands its attention no position_ids for 3-row positions.)"""
    cache = kwargs.get(FORWARD_KWARG)
    if cache is not None:
        cache.check_positions(kwargs.get("position_ids"))


def install(model) -> None:
    """Register, then switch only the text model (a plain string would also switch the vision tower), and hook
    the text model's forward to check its positions."""
    register()
    if "text_config" in getattr(model.config, "sub_configs", {}):
        model.set_attn_implementation({"text_config": NAME})
    else:
        model.set_attn_implementation(NAME)
    for m in model.modules():  # the text decoder stack(s): layers + a rotary embedding (vision towers differ)
        if hasattr(m, "layers") and hasattr(m, "rotary_emb") and not getattr(m, "_infmllm_positions_hooked", False):
            m.register_forward_pre_hook(_check_positions, with_kwargs=True)
            m._infmllm_positions_hooked = True

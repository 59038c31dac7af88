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


def install(model) -> None:
    """Register, then switch only the text model (a plain string would also switch the vision tower)."""
    register()
    if "text_config" in getattr(model.config, "sub_configs", {}):
        model.set_attn_implementation({"text_config": NAME})
    else:
        model.set_attn_implementation(NAME)

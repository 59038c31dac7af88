"""The seam between the session and the KV cache.

The session talks to the cache only through the contract in docs/INTERNALS.md (begin_forward, forward_kwargs,
end_chunk, next_position, get_seq_length, stored, stats, reset, kv_bytes_for). `infmllm_ros.cache.BoundedCache` is
the real one; `FullCache` is a never-evicting stand-in over transformers' DynamicCache with the same surface, used
only when the bounded cache is not importable (and as a test reference).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

try:
    from infmllm_ros.cache import BoundedCache as _Bounded
except ImportError:  # the cache package is built in parallel; keep the engine importable without it
    _Bounded = None

try:
    from infmllm_ros.cache import CacheConfig
except ImportError:
    from infmllm_ros.cache.config import CacheConfig


def _kv_bytes_full(cfg, model_config, dtype) -> int:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * kv_heads * head_dim * cfg.capacity * elem


class FullCache(DynamicCache):
    """Never-evicting cache with the BoundedCache surface (positions = absolute stream positions)."""

    def __init__(self, cfg, model_config, device=None, dtype=None):
        super().__init__(config=model_config.get_text_config() if hasattr(model_config, "get_text_config") else None)
        self.cfg, self._model_config, self._next = cfg, model_config, 0

    @staticmethod
    def kv_bytes_for(cfg, model_config, dtype) -> int:
        return _kv_bytes_full(cfg, model_config, dtype)

    def begin_forward(self, position_ids: torch.Tensor, prefill: bool = True) -> None:
        self._next = max(self._next, int(position_ids.max()) + 1)

    def forward_kwargs(self) -> dict:
        return {}

    def end_chunk(self) -> None:
        pass

    @property
    def next_position(self) -> int:
        return self._next

    @property
    def stored(self) -> int:
        return self.get_seq_length()

    def stats(self) -> dict:
        n = self.get_seq_length()
        kv = sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values)
                 if isinstance(t, torch.Tensor))
        return dict(seen=n, stored=n, budget=None, capacity=None, kv_bytes=kv, evictions=0,
                    next_position=self._next, policy="full(dynamic)")

    def reset(self) -> None:
        self.__init__(self.cfg, self._model_config)


def cache_class():
    """BoundedCache when available, else the FullCache stand-in."""
    return _Bounded if _Bounded is not None else FullCache


def install_attention(model) -> None:
    """Register the cache's attention function on the text model, when the bounded cache is in use."""
    if _Bounded is None:
        return
    from infmllm_ros import attention

    attention.install(model)


__all__ = ["CacheConfig", "FullCache", "cache_class", "install_attention"]

"""Bounded Inf-MLLM KV cache: static buffers, eviction policies, RoPE re-indexing."""

from .bounded import FORWARD_KWARG, BoundedCache
from .config import CacheConfig
from .policies import POLICIES, Candidates, Policy, register

__all__ = ["FORWARD_KWARG", "POLICIES", "BoundedCache", "CacheConfig", "Candidates", "Policy", "register"]

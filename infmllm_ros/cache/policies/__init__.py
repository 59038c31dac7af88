"""Eviction policies: one file each, registered by `@register(name)`; import it here (one line)."""

from . import full, h2o, saddle, streaming_llm  # noqa: F401  (registration)
from .base import POLICIES, Candidates, Policy, register, select


def make_policy(config) -> Policy:
    return POLICIES[config.policy].from_config(config)


__all__ = ["POLICIES", "Candidates", "Policy", "make_policy", "register", "select"]

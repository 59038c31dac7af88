"""Full cache: never evicts (the reference; capacity must hold the whole stream)."""

from dataclasses import dataclass

from .base import Candidates, Policy, register


@register("full")
@dataclass
class Full(Policy):
    def keep(self, c: Candidates):
        return None

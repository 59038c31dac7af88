"""H2O (Zhang et al. 2023): recent + heavy hitters by attention accumulated over every step (decode included)."""

from dataclasses import dataclass

from .base import Candidates, Policy, register


@register("h2o")
@dataclass
class H2O(Policy):
    scores = "every_step"  # the attention function adds each forward's column sums: what makes H2O costly

    def score(self, c: Candidates):
        return c.accumulated

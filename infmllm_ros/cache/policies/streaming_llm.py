"""StreamingLLM (Xiao et al. 2023): the first `sinks` tokens + the newest budget - sinks tokens."""

from dataclasses import dataclass

from .base import Candidates, Policy, register


@register("streaming_llm")
@dataclass
class StreamingLLM(Policy):
    def score(self, c: Candidates):
        return c.index.float()  # newer is better: top-k of the non-sinks is the recent window

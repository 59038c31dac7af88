"""CacheConfig: every knob of the bounded KV cache, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

from .policies import POLICIES

BIASES = ("none", "linear", "age_decay")
POSITIONS = ("reindex", "absolute")


@dataclass
class CacheConfig:
    """Hyperparameters of the bounded cache (Inf-MLLM "saddle" policy and its baselines).

    policy:          "saddle" (recent + top-k by retrieval-window score), "streaming_llm" (sinks + recent),
                     "h2o" (recent + top-k by scores accumulated over every step), "full" (never evicts).
    budget:          tokens stored per layer (and per KV head) after each eviction.
    recent:          newest tokens always kept (saddle, h2o). StreamingLLM keeps budget - sinks recent tokens.
    window:          retrieval window (saddle): 0 = every query of the prefill chunk votes (the paper's window,
                     the whole new prompt); a positive value caps it to the chunk's last `window` queries.
    sinks:           first tokens of the stream always kept (0 = none).
    bias:            tilt of the eviction score toward newer tokens: "none", "linear" (recency, additive,
                     scale-free) or "age_decay" (score * exp(-strength * chunks since the token arrived)).
    bias_strength:   0 turns the bias off.
    positions:       "reindex" squeezes evicted positions out and re-rotates kept keys (bounded positions);
                     "absolute" keeps the stream positions (the test oracle).
    max_chunk:       largest prefill chunk the session will feed.
    max_new_tokens:  largest number of decoded tokens between two prefill chunks.
    recall_slots:    slots reserved for archived frames recalled at question time (memory/recall.py): filled
                     before a question, released after its answer, never eviction candidates; 0 = no recall.
    """

    policy: str = "saddle"
    budget: int = 512
    recent: int = 64
    window: int = 0
    sinks: int = 0
    bias: str = "linear"
    bias_strength: float = 1.0
    positions: str = "reindex"
    max_chunk: int = 256
    max_new_tokens: int = 64
    recall_slots: int = 0

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"CacheConfig: {msg} (got {self})")

        if self.policy not in POLICIES:
            bad(f"unknown policy {self.policy!r}; choose one of {sorted(POLICIES)}")
        if self.bias not in BIASES:
            bad(f"unknown bias {self.bias!r}; choose one of {BIASES}")
        if self.positions not in POSITIONS:
            bad(f"unknown positions mode {self.positions!r}; choose one of {POSITIONS}")
        for name in ("budget", "max_chunk"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1")
        for name in ("recent", "window", "sinks", "max_new_tokens", "recall_slots"):
            if int(getattr(self, name)) < 0:
                bad(f"{name} must be >= 0")
        if self.bias_strength < 0:
            bad("bias_strength must be >= 0 (0 turns the bias off)")
        if self.recent > self.budget:
            bad(f"recent ({self.recent}) > budget ({self.budget}): the protected recent tokens must fit the budget")
        if self.sinks + self.recent > self.budget:
            bad(f"budget ({self.budget}) < sinks + recent ({self.sinks} + {self.recent}): protected tokens must fit")
        if self.policy == "streaming_llm" and self.sinks >= self.budget:
            bad(f"streaming_llm needs sinks ({self.sinks}) < budget ({self.budget}) to keep any recent token")

    @property
    def capacity(self) -> int:
        """Slots per layer: what survives an eviction + one chunk + one answer (+ the recalled frames)."""
        return self.budget + self.max_chunk + self.max_new_tokens + self.recall_slots

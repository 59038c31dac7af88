"""The cache policies every benchmark compares, and one chunk's forward through a cache (the session's loop).

Every policy runs through `infmllm_ros.cache.BoundedCache` (same engine, side by side). When that package is not
importable, only the full cache is available, through a plain transformers DynamicCache with absolute positions
(`DynamicFull`), so the harness still runs; the other policies are then reported as skipped, never faked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

DEFAULT_SINKS = 4
DEFAULT_WINDOW = 0  # saddle's retrieval window: 0 = every query of the chunk votes (CacheConfig's default)
DEFAULT_SADDLE_SWEEP = ("none:0", "linear:0.5", "linear:1", "linear:2", "age_decay:0.1", "age_decay:0.5")


@dataclass(frozen=True)
class PolicySpec:
    """One cache configuration under test; budget-free (see `cache_config`)."""

    name: str
    policy: str  # full | streaming_llm | h2o | saddle | reference (recompute, no cache)
    positions: str = "reindex"
    sinks: int = 0
    recent_fraction: float = 1.0  # recent = round(fraction * budget) - sinks for streaming_llm, else fraction * budget
    window: int = DEFAULT_WINDOW
    bias: str = "none"
    bias_strength: float = 0.0

    def recent(self, budget: int) -> int:
        if self.policy == "streaming_llm":
            return budget - self.sinks
        return max(1, int(round(self.recent_fraction * budget)))

    def cache_config(self, budget: int, chunk: int, max_new_tokens: int = 0):
        from infmllm_ros.cache import CacheConfig

        return CacheConfig(policy=self.policy, budget=budget, recent=self.recent(budget),
                           window=min(self.window, chunk) if self.window else 0, sinks=self.sinks, bias=self.bias,
                           bias_strength=self.bias_strength, positions=self.positions, max_chunk=chunk,
                           max_new_tokens=max_new_tokens)

    def describe(self, budget: int | None = None) -> dict:
        d = asdict(self)
        if budget is not None and self.policy not in ("full", "reference"):
            d["recent"] = self.recent(budget)
        return d


FULL_ABSOLUTE = PolicySpec("full_absolute", "full", positions="absolute")
REFERENCE = PolicySpec("reference_recompute", "reference")


def parse_saddle(item: str) -> tuple[str, float]:
    form, _, strength = item.partition(":")
    return form, float(strength or 1.0)


def saddle_spec(form: str, strength: float, window: int = DEFAULT_WINDOW) -> PolicySpec:
    return PolicySpec(f"saddle[{form},{strength:g}]", "saddle", sinks=DEFAULT_SINKS, recent_fraction=0.25,
                      window=window, bias=form, bias_strength=strength)


def bounded_policies(saddle_sweep=DEFAULT_SADDLE_SWEEP, window: int = DEFAULT_WINDOW) -> list[PolicySpec]:
    """The budgeted policies, in report order; `window` is the saddle's retrieval window (0 = whole chunk)."""
    specs = [
        PolicySpec("window_no_sinks", "streaming_llm", sinks=0),
        PolicySpec("streaming_llm", "streaming_llm", sinks=DEFAULT_SINKS),
        PolicySpec("h2o", "h2o", sinks=0, recent_fraction=0.5),
    ]
    specs += [saddle_spec(*parse_saddle(s), window) for s in saddle_sweep]
    return specs


def with_name(spec: PolicySpec, name: str) -> PolicySpec:
    return replace(spec, name=name)


def cache_available() -> str | None:
    """None when infmllm_ros.cache + attention are importable, else the reason."""
    try:
        from infmllm_ros import attention  # noqa: F401
        from infmllm_ros.cache import BoundedCache, CacheConfig  # noqa: F401
    except ImportError as e:
        return f"infmllm_ros.cache not available ({e})"
    return None


def prepare(model) -> None:
    """Installs the bounded cache's attention function on the model (no-op without the cache package)."""
    if cache_available() is None:
        from infmllm_ros import attention

        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if getattr(text, "_attn_implementation", None) != attention.NAME:
            attention.install(model)


class DynamicFull:
    """The full cache with absolute positions through transformers' DynamicCache (fallback, same interface)."""

    def __init__(self, model_config):
        from transformers import DynamicCache

        self.cache = DynamicCache(config=model_config)
        self.seen = 0

    @property
    def next_position(self) -> int:
        return self.seen

    def begin_forward(self, position_ids, prefill=True):
        self._q = position_ids.shape[-1]

    def forward_kwargs(self) -> dict:
        return {}

    def end_chunk(self):
        pass

    def after_forward(self):
        self.seen += self._q

    def kv_bytes(self) -> int:
        total = 0
        for layer in self.cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def stats(self) -> dict:
        return {"seen": self.seen, "stored": self.seen, "kv_bytes": self.kv_bytes(), "policy": "full(DynamicCache)"}


def make_cache(spec: PolicySpec, model, budget: int, chunk: int, device, dtype):
    """A fresh cache for spec at budget (the full cache gets budget = the stream length)."""
    if cache_available() is None:
        from infmllm_ros.cache import BoundedCache

        return BoundedCache(spec.cache_config(budget, chunk), model.config, device, dtype)
    if spec.policy == "full" and spec.positions == "absolute":
        return DynamicFull(model.config)
    raise RuntimeError(cache_available())


def feed_chunk(model, cache, chunk_ids: torch.Tensor) -> torch.Tensor:
    """One prefill chunk (shape (1, q)) through the cache, eviction included; returns the chunk's logits (1, q, V)."""
    q = chunk_ids.shape[-1]
    pos = (cache.next_position + torch.arange(q, device=chunk_ids.device)).unsqueeze(0)
    cache.begin_forward(pos, prefill=True)
    kv = cache.cache if isinstance(cache, DynamicFull) else cache
    out = model(input_ids=chunk_ids, position_ids=pos, cache=kv, use_cache=True, **cache.forward_kwargs())
    if isinstance(cache, DynamicFull):
        cache.after_forward()
    cache.end_chunk()
    return out.logits

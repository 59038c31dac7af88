"""Helpers for the engine tests (a unique module name: several test dirs have a conftest.py)."""

import numpy as np

from infmllm_ros.engine import StreamingSession
from infmllm_ros.engine.tiny import tiny_model

_MODELS: dict = {}


def get_tiny(family):
    """Tiny (model, processor), loaded once per process and shared by the tests (sessions own the caches)."""
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family, seed=0)
    return _MODELS[family]


def frame(seed: int, h: int = 32, w: int = 32) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def make_session(model, proc, cfg, **kw) -> StreamingSession:
    kw.setdefault("system_prompt", "You are a robot.")
    kw.setdefault("suppress_tokens", proc.tokenizer.all_special_ids)  # random weights emit specials otherwise
    return StreamingSession(model, proc, cache=cfg, **kw)

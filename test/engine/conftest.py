"""Shared fixtures for the engine tests: tiny models loaded once per test session, deterministic frames."""

import numpy as np
import pytest
import torch
from transformers.utils import logging as hf_logging

from infmllm_ros.engine import StreamingSession
from infmllm_ros.engine.tiny import FAMILIES, tiny_model

hf_logging.disable_progress_bar()
torch.set_num_threads(1)  # shared 2-core machine; tiny models gain nothing from threads

_MODELS: dict = {}


def get_tiny(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family, seed=0)
    return _MODELS[family]


@pytest.fixture(scope="session")
def tiny():
    return get_tiny


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def frame(seed: int, h: int = 32, w: int = 32) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def make_session(model, proc, cfg, **kw) -> StreamingSession:
    kw.setdefault("system_prompt", "You are a robot.")
    kw.setdefault("suppress_tokens", proc.tokenizer.all_special_ids)  # random weights emit specials otherwise
    return StreamingSession(model, proc, cache=cfg, **kw)

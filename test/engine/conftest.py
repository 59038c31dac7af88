"""Fixtures for the engine tests: tiny models loaded once per test session."""

import pytest
import torch
from engine_helpers import get_tiny
from transformers.utils import logging as hf_logging

from infmllm_ros.engine.tiny import FAMILIES

hf_logging.disable_progress_bar()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on the shared 2-core machine 2 threads under load made this suite
    8x slower (5 min against 40 s). Scoped to each engine test; the previous setting is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny():
    return get_tiny


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param

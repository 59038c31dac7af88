"""Fixtures for the engine tests: tiny models loaded once per test session."""

import pytest
import torch
from engine_helpers import get_tiny
from transformers.utils import logging as hf_logging

from infmllm_ros.engine.tiny import FAMILIES

hf_logging.disable_progress_bar()
torch.set_num_threads(1)  # shared 2-core machine; tiny models gain nothing from threads


@pytest.fixture(scope="session")
def tiny():
    return get_tiny


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param

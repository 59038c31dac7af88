import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fixture_build

from fixture_build import build  # noqa: E402


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory):
    """name -> a built checkpoint dir (built once per test session, on first use)."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = build(name, tmp_path_factory.mktemp("ckpt") / name)
        return built[name]

    return get

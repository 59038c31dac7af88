import shutil

import pytest

from infmllm_ros.bench import corpus


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian bible-kjv not installed")
def test_kjv_dump_and_split():
    data = corpus.kjv_bytes()
    assert data.startswith(b"Ge1:1 In the beginning God created the heaven and the earth.")
    assert 4_000_000 < len(data) < 5_000_000
    assert b"\x00" not in data
    parts = corpus.split(data)
    assert b"\nRev22:21 " in parts.held_out and b"Ge1:1 " in parts.train
    assert b"Acts22:13 " in parts.held_out[:200]  # the last 10 % starts in Acts 22

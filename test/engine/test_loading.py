"""Loading like a user: one-line errors for missing dirs, dtype auto, generation_config honoured by the sampler."""

import json

import pytest
import torch
from transformers import AutoConfig
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper

from infmllm_ros.engine import loading, sampling, tiny


def test_missing_local_dir_is_one_line(tmp_path):
    for p in (str(tmp_path / "nope"), "./no/such/dir", "/definitely/not/here"):
        with pytest.raises(FileNotFoundError) as e:
            loading.load(p)
        assert "\n" not in str(e.value) and "does not exist" in str(e.value) and "'model'" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        loading.load(str(tmp_path / "empty"))


def test_auto_dtype():
    cfg = AutoConfig.for_model("llava")
    assert loading.auto_dtype(cfg, "cpu") is torch.float32
    cfg.dtype = "float16"
    assert loading.auto_dtype(cfg, "cuda") is torch.float16
    cfg.dtype = "float32"
    assert loading.auto_dtype(cfg, "cuda") is torch.bfloat16


def test_repetition_penalty_matches_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g)
    prev = [3, 7, 7, 20]
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prev]), logits.clone()[None])[0]
    assert torch.equal(sampling.penalize_repeats(logits.clone(), prev, 1.3), ref)


def test_top_k_sampling_matches_transformers_support():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    allowed = set(torch.nonzero(torch.isfinite(TopKLogitsWarper(5)(None, logits.clone()[None])[0])).flatten().tolist())
    g = torch.Generator().manual_seed(2)
    picks = {sampling.choose(logits, 5.0, 1.0, g, top_k=5) for _ in range(300)}
    assert picks <= allowed and len(picks) == 5  # high temperature: every kept token shows up, no other


def test_session_takes_generation_config(tmp_path):
    from infmllm_ros.engine import StreamingSession

    d = tiny.save("qwen2_vl", 0, tmp_path / "q")
    (d / "generation_config.json").write_text(json.dumps({"top_k": 1, "repetition_penalty": 1.05,
                                                          "eos_token_id": [3, 4]}))
    s = StreamingSession.from_pretrained(str(d))
    assert (s.top_k, s.repetition_penalty) == (1, 1.05) and {3, 4} <= s.eos_ids and s.dtype is torch.float32
    plain = StreamingSession.from_pretrained(str(tiny.save("qwen2_vl", 0, tmp_path / "p")))
    assert (plain.top_k, plain.repetition_penalty) == (0, 1.0)  # HF's implicit top_k=50 is not applied

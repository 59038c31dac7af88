"""StreamingSession.ask with the xgrammar action constraint (bitmask applied in place to the logits): a random-
weight VLM sampling at temperature 1 only writes JSON that the jsonschema validator accepts for the action schema."""

import json

import pytest
from engine_helpers import frame, make_session

from infmllm_ros.actions import ActionConstraint, ActionSpec
from infmllm_ros.cache import CacheConfig

jsonschema = pytest.importorskip("jsonschema")
CFG = CacheConfig(policy="saddle", budget=256, recent=32, window=16, max_chunk=128, max_new_tokens=80)


def test_session_answers_inside_the_action_schema(tiny):
    model, proc = tiny("qwen2_vl")
    tok = proc.tokenizer
    s = make_session(model, proc, CFG, suppress_tokens=[i for i in tok.all_special_ids if i != tok.eos_token_id])
    s.observe(frame(1), 0.0)
    c = ActionConstraint(ActionSpec(skills=("dock",)), tok, backend="xgrammar")
    finished = 0
    for seed in range(6):
        a = s.ask("action: go", max_new_tokens=80, temperature=1.0, seed=seed, allowed_tokens_fn=c.allowed_tokens_fn())
        if a.finish_reason != "eos":
            assert a.finish_reason == "length"  # cut off mid-object: the validator refuses it later, no action
            continue
        finished += 1
        jsonschema.validate(json.loads(a.text), c.schema)
    assert finished >= 3

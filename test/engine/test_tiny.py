"""Tiny offline models: every family generates, weights are deterministic from the seed, save/load is lossless."""

import numpy as np
import pytest
import torch
from PIL import Image

from infmllm_ros.engine.tiny import EXTRA_FAMILIES, FAMILIES, build, tiny_model


def _inputs(proc, seed=0):
    img = Image.fromarray(np.random.RandomState(seed).randint(0, 255, (40, 60, 3), dtype=np.uint8))
    content = [{"type": "image", "image": img}, {"type": "text", "text": "Describe the image."}]
    msgs = [{"role": "user", "content": content}]
    return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    return_tensors="pt")


@pytest.fixture(scope="module", params=FAMILIES + EXTRA_FAMILIES)
def family_model(request):
    model, proc = tiny_model(request.param, seed=0)
    return request.param, model, proc


def test_generates_from_image_and_text(family_model):
    family, model, proc = family_model
    inp = _inputs(proc)
    n = inp["input_ids"].shape[1]
    special = proc.tokenizer.all_special_ids
    out = model.generate(**inp, max_new_tokens=6, do_sample=False, suppress_tokens=special)
    new = out[0, n:].tolist()
    assert len(new) == 6 and not set(new) & set(special), (family, new)
    assert isinstance(proc.tokenizer.decode(new), str)
    # the image tokens really reach the model: another image changes the logits
    with torch.no_grad():
        a = model(**inp).logits[0, -1]
        b = model(**_inputs(proc, seed=1)).logits[0, -1]
    assert not torch.allclose(a, b)


def test_deterministic_from_seed(family_model):
    family, model, _ = family_model
    m0, _ = build(family, seed=0)
    m1, _ = build(family, seed=1)
    s, s0, s1 = model.state_dict(), m0.state_dict(), m1.state_dict()
    assert s.keys() == s0.keys()
    assert all(torch.equal(s[k], s0[k]) for k in s)  # same seed, loaded from disk == built in memory
    assert any(not torch.equal(s0[k], s1[k]) for k in s0 if s0[k].is_floating_point() and s0[k].numel() > 1)


def test_save_load_round_trip_logits(family_model, tmp_path):
    family, _, _ = family_model
    built, proc = build(family, seed=3)
    loaded, proc2 = tiny_model(family, seed=3, path=tmp_path / family)
    inp, inp2 = _inputs(proc), _inputs(proc2)
    assert torch.equal(inp["input_ids"], inp2["input_ids"])  # processor + tokenizer + chat template survive
    with torch.no_grad():
        assert torch.equal(built(**inp).logits, loaded(**inp2).logits)
    assert type(proc2) is type(proc)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown tiny family"):
        tiny_model("nope")

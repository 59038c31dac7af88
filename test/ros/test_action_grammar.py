"""xgrammar action constraint at real vocabulary sizes: under random logits, every answer that ends is valid JSON
for the action schema (oracle: the ``jsonschema`` validator, not our parser), through the session's own masking
path (sampling.mask_logits with the in-place bitmask), and nothing leaks through padding or special ids."""

import json
import sys

import pytest
import torch

pytest.importorskip("transformers")
jsonschema = pytest.importorskip("jsonschema")

from infmllm_ros.actions import ActionConstraint, ActionSpec, parse_action  # noqa: E402
from infmllm_ros.engine.sampling import choose, mask_logits  # noqa: E402

SPEC = ActionSpec(skills=("dock", "wave"))


@pytest.fixture(scope="module", params=["32k", "128k"])
def big(request):
    from infmllm_ros.bench.big_vocab import SIZES, build_big_tokenizer

    # one intra-op thread: on a shared 2-core machine, 2-thread reductions over 128K logits stall for tens of ms
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = build_big_tokenizer(SIZES[request.param])
    yield tok, ActionConstraint(SPEC, tok, backend="xgrammar")
    torch.set_num_threads(threads)


def _decode_random(c, tok, gen, width, max_steps=300):
    """One answer with random logits, masked the way StreamingSession.ask masks them. None if cut off."""
    suppress = torch.tensor([i for i in tok.all_special_ids if i != tok.eos_token_id])
    mask, ids = c.allowed_tokens_fn(), []
    for _ in range(max_steps):
        logits = torch.randn(width, generator=gen)
        t = choose(mask_logits(logits, suppress, None, lambda out: mask.apply_(ids, out)))  # argmax of noise
        if t == tok.eos_token_id:
            return tok.decode(ids)
        ids.append(t)
    return None


def test_random_logits_only_give_schema_valid_json(big):
    tok, c = big
    gen = torch.Generator().manual_seed(0)
    done = []
    for _ in range(16):
        text = _decode_random(c, tok, gen, len(tok))
        if text is None:
            continue
        obj = json.loads(text)
        jsonschema.validate(obj, c.schema)  # the oracle: raises on anything outside the schema
        a = parse_action(text, SPEC)
        assert a.clamped == ()  # the grammar keeps numbers inside the limits, so nothing needs clamping
        done.append(a.kind)
    assert len(done) >= 12 and len(set(done)) >= 3, done


def test_padded_logits_and_special_ids_never_allowed(big):
    tok, c = big
    width = len(tok) + 200  # model logits wider than the tokenizer (Qwen2: 151936 vs 151665)
    mask = c.allowed_tokens_fn()
    ids = []
    for t in tok.encode('{"action": "look", "pan": 0.5, "tilt"', add_special_tokens=False):
        logits = torch.zeros(width)
        mask.apply_(ids, logits)
        assert torch.isfinite(logits[t]), (tok.decode(ids), tok.decode([t]))  # the real answer stays allowed
        assert not torch.isfinite(logits[len(tok):]).any()
        assert not torch.isfinite(logits[[i for i in tok.all_special_ids]]).any()
        ref = torch.zeros(width)  # oracle: xgrammar's own kernel on the same bitmask (+ the padding rule)
        mask._xgr.apply_token_bitmask_inplace(ref.view(1, -1), mask.bitmask, vocab_size=len(tok))
        ref[len(tok):] = float("-inf")
        assert torch.equal(logits, ref)
        # the id-list interface agrees with the in-place mask (a fresh mask over the same prefix)
        listed = c.allowed_tokens_fn()(ids)
        assert listed == torch.nonzero(torch.isfinite(logits[: len(tok)])).flatten().tolist()
        ids.append(t)
    with pytest.raises(ValueError, match="not allowed"):
        mask.apply_(ids + tok.encode("}", add_special_tokens=False), torch.zeros(width))  # "tilt" needs a value


def test_auto_falls_back_to_lmfe_without_xgrammar(monkeypatch):
    from fake_session import CharTokenizer  # test/ros/fake_session.py

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar -> ImportError
    c = ActionConstraint(SPEC, CharTokenizer())
    assert c.backend == "lmfe" and "xgrammar unavailable" in c.fallback_reason
    with pytest.raises(ImportError):
        ActionConstraint(SPEC, CharTokenizer(), backend="xgrammar")

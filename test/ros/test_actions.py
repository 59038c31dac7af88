"""Action safety without ROS: the schema, the parser/validator under thousands of random and adversarial
strings, the motion gate (armed / limits / watchdog), and lm-format-enforcer constrained decoding."""

from __future__ import annotations

import json
import math
import random
import re
import string
from pathlib import Path

import pytest

from infmllm_ros.actions import (
    Action,
    ActionConstraint,
    ActionError,
    ActionSpec,
    ActionValidator,
    Limit,
    MotionGate,
    parse_action,
)

REPO = Path(__file__).resolve().parents[2]
SPEC = ActionSpec.from_yaml(REPO / "config" / "actions.yaml")


def within(spec: ActionSpec, lx: float, az: float) -> bool:
    return (math.isfinite(lx) and math.isfinite(az) and spec.linear_x.min <= lx <= spec.linear_x.max
            and spec.angular_z.min <= az <= spec.angular_z.max)


def test_yaml_loads_limits_and_skills():
    assert SPEC.linear_x == Limit(-0.2, 0.5) and SPEC.duration.min > 0
    assert "dock" in SPEC.skills
    kinds = [o["properties"]["action"]["const"] for o in SPEC.json_schema()["anyOf"]]
    assert kinds == ["move", "stop", "look", "skill", "none"]


@pytest.mark.parametrize("bad", [
    {"move": {"linear_x": {"min": 1, "max": 0}}},
    {"move": {"duration": {"min": 0, "max": 1}}},
    {"move": {"speed": {"min": 0, "max": 1}}},
    {"skills": ["rm -rf /"]},
    {"skills": ["a", "a"]},
    {"teleport": {}},
    {"move": {"linear_x": {"min": float("nan"), "max": 1}}},
])
def test_bad_specs_rejected(bad):
    with pytest.raises(ValueError):
        ActionSpec.from_dict(bad)


def test_valid_actions_parse_and_clamp():
    a = parse_action('{"action": "move", "linear_x": 0.3, "angular_z": -0.2, "duration": 1.0}', SPEC)
    assert (a.kind, a.linear_x, a.angular_z, a.duration, a.clamped) == ("move", 0.3, -0.2, 1.0, ())
    a = parse_action('{"duration": 99, "action": "move", "angular_z": 5, "linear_x": -7}', SPEC)
    assert (a.linear_x, a.angular_z, a.duration) == (-0.2, 1.0, 3.0)
    assert set(a.clamped) == {"linear_x", "angular_z", "duration"}
    assert parse_action(' {"action":"stop"} \n', SPEC).kind == "stop"
    assert parse_action('{"action":"look","pan":0.1,"tilt":-9}', SPEC).tilt == -0.6
    assert parse_action('{"action":"skill","name":"dock"}', SPEC).name == "dock"
    assert parse_action('{"action":"none"}', SPEC).kind == "none"
    assert json.loads(a.to_json())["clamped"] == list(a.clamped)


ADVERSARIAL = [
    "", " ", "null", "[]", "42", '"move"', "{}", '{"action": null}', '{"action": "MOVE"}', '{"action": "m\u043eve"}',
    '{"action": "move"}', '{"action": "move", "linear_x": 0.1, "angular_z": 0}',
    '{"action": "move", "linear_x": NaN, "angular_z": 0, "duration": 1}',
    '{"action": "move", "linear_x": Infinity, "angular_z": 0, "duration": 1}',
    '{"action": "move", "linear_x": -Infinity, "angular_z": 0, "duration": 1}',
    '{"action": "move", "linear_x": 1e999, "angular_z": 0, "duration": 1}',
    '{"action": "move", "linear_x": ' + "9" * 400 + ', "angular_z": 0, "duration": 1}',
    '{"action": "move", "linear_x": ' + "9" * 5000 + ', "angular_z": 0, "duration": 1}',
    '{"action": "move", "linear_x": true, "angular_z": 0, "duration": 1}',
    '{"action": "move", "linear_x": "0.1", "angular_z": 0, "duration": 1}',
    '{"action": "move", "linear_x": [0.1], "angular_z": 0, "duration": 1}',
    '{"action": "move", "linear_x": null, "angular_z": 0, "duration": 1}',
    '{"action": "move", "linear_x": 0.1, "angular_z": 0, "duration": 1, "turbo": true}',
    '{"action": "move", "action": "stop", "linear_x": 0.1, "angular_z": 0, "duration": 1}',
    '{"action": "stop"} {"action": "move", "linear_x": 0.5, "angular_z": 0, "duration": 3}',
    '{"action": "stop"}garbage', '{"action": "stop"', '{"action": "stop",}', "{'action': 'stop'}",
    '[{"action": "stop"}]', '{"action": ["move"]}', '{"action": {"x": 1}}',
    '{"action": "skill", "name": "self_destruct"}', '{"action": "skill", "name": "DOCK"}', '{"action": "skill"}',
    '{"action": "look", "pan": 0.1}', "[" * 100000 + "]" * 100000,
    '{"action": "stop", "x": ' + "[" * 5000 + "]" * 5000 + "}",
    '{"action": "stop"}' + " " * 600, "\x00" * 10, '{"action": "stop\x00"}', '{"action": "none", "note": "hi"}',
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_strings_rejected(text):
    with pytest.raises(ActionError):
        parse_action(text, SPEC)


def _mutations(rng: random.Random, base: str, n: int):
    alphabet = string.printable + "\u00e9\u043e\ufffd{}[]\":,.-eE+0123456789"
    for _ in range(n):
        s = list(base)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(s) + 1)
            if op < 0.4 and s:
                s[min(pos, len(s) - 1)] = rng.choice(alphabet)
            elif op < 0.7:
                s.insert(pos, rng.choice(alphabet))
            elif s:
                del s[min(pos, len(s) - 1)]
        yield "".join(s)


def _random_values(rng: random.Random):
    pool = [0, -0.0, 1, -1, 0.5, 1e308, -1e308, 5e-324, 10**30, "1e999", "NaN", "-Infinity", "true", "null", '"1"',
            "[]", "{}", rng.uniform(-100, 100), rng.uniform(-1, 1), rng.randint(-10**9, 10**9)]
    v = rng.choice(pool)
    return v if isinstance(v, str) else json.dumps(v)


def fuzz_corpus(seed: int = 0, n: int = 6000) -> list[str]:
    rng = random.Random(seed)
    out = []
    valid = ['{"action": "move", "linear_x": 0.2, "angular_z": 0.1, "duration": 1.0}', '{"action": "stop"}',
             '{"action": "look", "pan": 0.2, "tilt": 0.1}', '{"action": "skill", "name": "wave"}']
    for base in valid:
        out += list(_mutations(rng, base, n // 8))
    keys = ["action", "linear_x", "angular_z", "duration", "pan", "tilt", "name", "x", "ACTION"]
    kinds = ['"move"', '"stop"', '"look"', '"skill"', '"none"', '"fly"', "1", "null"]
    for _ in range(n // 4):  # random objects over the right vocabulary
        fields = [f'"action": {rng.choice(kinds)}'] + [
            f'"{rng.choice(keys)}": {_random_values(rng)}' for _ in range(rng.randint(0, 5))]
        rng.shuffle(fields)
        out.append("{" + ", ".join(fields) + "}")
    for _ in range(n // 8):  # well-formed moves with extreme / out-of-limit numbers (must be clamped)
        vals = [json.dumps(rng.choice([rng.uniform(-1e6, 1e6), rng.uniform(-2, 2), 1e308, -1e308, 5e-324, -0.0]))
                for _ in range(3)]
        out.append(f'{{"action": "move", "linear_x": {vals[0]}, "angular_z": {vals[1]}, "duration": {vals[2]}}}')
    for _ in range(n // 4):  # random bytes-ish noise
        out.append("".join(rng.choice(string.printable + "{}\":") for _ in range(rng.randint(0, 80))))
    return out


def test_fuzz_parser_gate_never_emits_invalid_twist():
    corpus = fuzz_corpus()
    assert len(corpus) >= 5000
    validator = ActionValidator(SPEC)
    armed, disarmed = MotionGate(SPEC), MotionGate(SPEC)
    armed.set_armed(True, 0.0)
    published_armed, published_disarmed = [], []
    for i, text in enumerate(corpus):
        action, err = validator.validate(text)
        assert (action is None) != (err is None)
        if action is None:
            continue
        d = action.to_dict()
        assert json.loads(action.to_json()) == d  # serialisable, no NaN
        for g, sink in ((armed, published_armed), (disarmed, published_disarmed)):
            tw = g.command(action, float(i))
            if tw is not None:
                sink.append(tw)
            tw = g.tick(float(i) + 0.05)
            if tw is not None:
                sink.append(tw)
        if action.kind == "move":
            assert within(SPEC, action.linear_x, action.angular_z)
            assert SPEC.duration.min <= action.duration <= SPEC.duration.max
        if action.kind == "look":
            assert SPEC.pan.min <= action.pan <= SPEC.pan.max and SPEC.tilt.min <= action.tilt <= SPEC.tilt.max
    st = validator.stats()
    assert st["accepted"] + st["rejected"] == len(corpus)
    assert st["rejected"] > len(corpus) // 2 and st["accepted"] > 500  # the corpus exercises both paths
    assert published_armed and all(within(SPEC, *tw) for tw in published_armed)
    assert published_disarmed == []  # disarmed publishes nothing


def test_gate_watchdog_zeroes_after_duration():
    g = MotionGate(SPEC)
    move = Action("move", linear_x=0.4, angular_z=0.2, duration=1.0)
    assert g.command(move, 0.0) is None  # disarmed at start
    assert g.set_armed(True, 0.0) is None
    assert g.command(move, 10.0) == (0.4, 0.2)
    assert g.tick(10.5) == (0.4, 0.2)  # re-sent while the motion lasts
    assert g.tick(11.0) == (0.0, 0.0)  # duration over: zero, once
    assert g.tick(11.1) is None and not g.active
    assert g.command(Action("move", linear_x=9.0, angular_z=-9.0, duration=99.0), 20.0) == (0.5, -1.0)  # clamped
    assert g.tick(22.9) == (0.5, -1.0) and g.tick(23.0) == (0.0, 0.0)  # duration clamped to 3 s
    g.command(move, 30.0)
    assert g.command(Action("stop"), 30.1) == (0.0, 0.0) and not g.active
    g.command(move, 40.0)
    assert g.set_armed(False, 40.1) == (0.0, 0.0)  # disarm while moving: zero
    assert g.tick(40.2) is None and g.command(move, 40.3) is None
    assert g.stop("deactivate") is None  # never moved since: nothing to zero
    g.set_armed(True, 50.0)
    g.command(move, 50.0)
    assert g.stop("error") == (0.0, 0.0) and g.tick(50.1) is None
    assert g.command(Action("look", pan=0.1), 60.0) is None and g.command(Action("skill", name="dock"), 60) is None


# ---------------------------------------------------------------------------------------------- constrained decoding


def _walk(constraint: ActionConstraint, tok, rng: random.Random, max_steps=200) -> str:
    fn, ids = constraint.allowed_tokens_fn(), []
    for _ in range(max_steps):
        allowed = fn(ids)
        assert allowed, "the constraint left no token"
        t = rng.choice(allowed)
        if t == tok.eos_token_id:
            break
        ids.append(t)
    return tok.decode(ids)


@pytest.mark.parametrize("backend", ["xgrammar", "lmfe"])
def test_constraint_random_walks_are_schema_shaped_char_tokenizer(backend):
    from fake_session import CharTokenizer  # test/ros/fake_session.py

    tok = CharTokenizer()
    c = ActionConstraint(SPEC, tok, backend=backend)
    assert c.backend == backend
    rng = random.Random(1)
    kinds = set()
    ok = 0
    for _ in range(60):
        text = _walk(c, tok, rng, max_steps=400)
        assert not re.search(r"\s{3,}", text), repr(text)  # max_whitespace=2 between JSON tokens
        try:
            a = parse_action(text, SPEC)
        except ActionError as e:  # only a non-finite number (the decoder does not bound exponents) or truncation
            assert "not finite" in str(e) or "out of float range" in str(e) or "not a single valid JSON" in str(e)
            continue
        ok += 1
        kinds.add(a.kind)
    assert ok >= 30 and len(kinds) >= 3


@pytest.mark.parametrize("backend", ["xgrammar", "lmfe"])
def test_constraint_with_hf_byte_level_tokenizer(backend):
    pytest.importorskip("transformers")
    from infmllm_ros.engine.tiny import build_tokenizer

    tok = build_tokenizer(["<image>"])
    c = ActionConstraint(SPEC, tok, backend=backend)
    assert c.backend == backend
    rng = random.Random(2)
    results = []
    for _ in range(25):
        text = _walk(c, tok, rng)
        try:
            results.append(parse_action(text, SPEC))
        except ActionError as e:
            assert "not finite" in str(e) or "out of float range" in str(e) or "not a single valid JSON" in str(e)
    assert len(results) >= 12
    # a greedy "model" that wants to leave the schema is forced back into it
    fn, ids = c.allowed_tokens_fn(), []
    want = tok.encode('{"action": "self_destruct"}', add_special_tokens=False)
    for t in want:
        allowed = fn(ids)
        if t in allowed:
            ids.append(t)
            continue
        others = sorted(a for a in allowed if a != tok.eos_token_id)  # sorted: the allowed order is not stable
        if not others:  # the schema closed the object: only end-of-sequence may follow
            break
        ids.append(others[0])
    assert '"self_destruct"' not in tok.decode(ids)

"""Robot actions: schema, constrained decoding, parsing, validation, clamping and the motion gate.

No ROS imports here (the node turns the results into messages). Everything fails closed: a model output that
does not parse, does not match the schema, or holds a non-finite number yields **no action** (an
:class:`ActionError` with a clear message), and the :class:`MotionGate` only ever emits velocities inside the
limits of ``config/actions.yaml``, only while armed, and zero when a motion's duration ends.

Pipeline (see ``docs/ros.md``)::

    ActionSpec.from_yaml("config/actions.yaml")
      -> spec.json_schema()                         # JSON schema of the allowed actions
      -> ActionConstraint(spec, tokenizer).allowed_tokens_fn()   # action_grammar.py: xgrammar bitmask, per answer
      -> session.ask(prompt, allowed_tokens_fn=...)  # the model can only write schema-valid JSON
      -> ActionValidator(spec).validate(text)        # parse -> validate -> clamp (never trusts the decoder)
      -> MotionGate.command(action, now)             # armed? within limits? -> (linear_x, angular_z) or None
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infmllm_ros.action_grammar import ActionConstraint  # re-exported: the node and tests import it from here

__all__ = [
    "Action",
    "ActionConstraint",
    "ActionError",
    "ActionSpec",
    "ActionValidator",
    "Limit",
    "MotionGate",
    "parse_action",
]

KINDS = ("move", "stop", "look", "skill", "none")
_SKILL_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


class ActionError(ValueError):
    """The model output is not an allowed action; the message says why. Means: no motion."""


@dataclass(frozen=True)
class Limit:
    min: float
    max: float

    def __post_init__(self):
        if not (math.isfinite(self.min) and math.isfinite(self.max)) or self.min > self.max:
            raise ValueError(f"invalid limit [{self.min}, {self.max}]")

    def clamp(self, v: float) -> float:
        return min(max(v, self.min), self.max)


@dataclass(frozen=True)
class ActionSpec:
    """The allowed actions and their limits (``config/actions.yaml``)."""

    linear_x: Limit = Limit(-0.2, 0.5)
    angular_z: Limit = Limit(-1.0, 1.0)
    duration: Limit = Limit(0.1, 3.0)
    pan: Limit = Limit(-1.57, 1.57)
    tilt: Limit = Limit(-0.6, 0.6)
    skills: tuple[str, ...] = ()
    max_text_chars: int = 512

    @classmethod
    def from_dict(cls, d: dict | None) -> ActionSpec:
        d = dict(d or {})
        known = {"move", "look", "skills", "max_text_chars"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown keys in actions config: {sorted(unknown)} (allowed: {sorted(known)})")

        def lim(section: str, name: str, default: Limit) -> Limit:
            sec = d.get(section) or {}
            if name not in sec:
                return default
            v = sec[name]
            if not isinstance(v, dict) or set(v) != {"min", "max"}:
                raise ValueError(f"{section}.{name} must be {{min: .., max: ..}}, got {v!r}")
            return Limit(float(v["min"]), float(v["max"]))

        for section, names in (("move", {"linear_x", "angular_z", "duration"}), ("look", {"pan", "tilt"})):
            extra = set(d.get(section) or {}) - names
            if extra:
                raise ValueError(f"unknown keys in {section}: {sorted(extra)} (allowed: {sorted(names)})")
        skills = tuple(str(s) for s in (d.get("skills") or ()))
        for s in skills:
            if not _SKILL_RE.match(s):
                raise ValueError(f"invalid skill name {s!r}: use letters, digits, '_' or '-', at most 64 chars")
        if len(set(skills)) != len(skills):
            raise ValueError(f"duplicate skill names in {skills}")
        duration = lim("move", "duration", cls.duration)
        if duration.min <= 0:
            raise ValueError("move.duration.min must be > 0 (a motion must end)")
        return cls(
            linear_x=lim("move", "linear_x", cls.linear_x),
            angular_z=lim("move", "angular_z", cls.angular_z),
            duration=duration,
            pan=lim("look", "pan", cls.pan),
            tilt=lim("look", "tilt", cls.tilt),
            skills=skills,
            max_text_chars=int(d.get("max_text_chars", cls.max_text_chars)),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> ActionSpec:
        import yaml

        with open(path, encoding="utf-8") as f:
            return cls.from_dict(yaml.safe_load(f))

    def json_schema(self) -> dict:
        """A JSON schema (anyOf one object per action kind) for constrained decoding."""

        def num(lim: Limit) -> dict:
            return {"type": "number", "minimum": lim.min, "maximum": lim.max}

        def obj(kind: str, props: dict) -> dict:
            return {
                "type": "object",
                "properties": {"action": {"type": "string", "const": kind}, **props},
                "required": ["action", *props],
                "additionalProperties": False,
            }

        options = [
            obj("move", {"linear_x": num(self.linear_x), "angular_z": num(self.angular_z),
                         "duration": num(self.duration)}),
            obj("stop", {}),
            obj("look", {"pan": num(self.pan), "tilt": num(self.tilt)}),
        ]
        if self.skills:
            options.append(obj("skill", {"name": {"type": "string", "enum": list(self.skills)}}))
        options.append(obj("none", {}))
        return {"anyOf": options}

    def describe(self) -> str:
        """One-paragraph description of the allowed actions, for the action prompt."""
        s = (
            'Reply with exactly one JSON object. Allowed: {"action": "move", "linear_x": m/s in '
            f'[{self.linear_x.min}, {self.linear_x.max}], "angular_z": rad/s in [{self.angular_z.min}, '
            f'{self.angular_z.max}], "duration": s in [{self.duration.min}, {self.duration.max}]}}, '
            '{"action": "stop"}, {"action": "look", "pan": rad in '
            f'[{self.pan.min}, {self.pan.max}], "tilt": rad in [{self.tilt.min}, {self.tilt.max}]}}, '
        )
        if self.skills:
            s += '{"action": "skill", "name": one of ' + ", ".join(self.skills) + "}, "
        return s + '{"action": "none"}.'


@dataclass(frozen=True)
class Action:
    """A validated, clamped action. ``clamped`` names the fields that were outside their limits."""

    kind: str
    linear_x: float = 0.0
    angular_z: float = 0.0
    duration: float = 0.0
    pan: float = 0.0
    tilt: float = 0.0
    name: str = ""
    clamped: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"action": self.kind}
        if self.kind == "move":
            d.update(linear_x=self.linear_x, angular_z=self.angular_z, duration=self.duration)
        elif self.kind == "look":
            d.update(pan=self.pan, tilt=self.tilt)
        elif self.kind == "skill":
            d["name"] = self.name
        if self.clamped:
            d["clamped"] = list(self.clamped)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)

    @property
    def moves_base(self) -> bool:
        return self.kind in ("move", "stop")


def _reject_constant(name: str):
    raise ActionError(f"non-finite number {name} is not allowed")


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ActionError(f"duplicate keys in action object: {keys}")
    return dict(pairs)


def _number(obj: dict, key: str, lim: Limit, clamped: list[str]) -> float:
    if key not in obj:
        raise ActionError(f"missing field {key!r}")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ActionError(f"field {key!r} must be a number, got {type(v).__name__}")
    try:
        f = float(v)
    except (OverflowError, ValueError):
        raise ActionError(f"field {key!r} is out of float range") from None
    if not math.isfinite(f):
        raise ActionError(f"field {key!r} is not finite: {f}")
    c = lim.clamp(f)
    if c != f:
        clamped.append(key)
    return c + 0.0  # -0.0 -> 0.0


def parse_action(text: str, spec: ActionSpec) -> Action:
    """Parse, validate and clamp one action. Raises :class:`ActionError` on anything not allowed."""
    if not isinstance(text, str):
        raise ActionError(f"action text must be str, got {type(text).__name__}")
    if len(text) > spec.max_text_chars:
        raise ActionError(f"action text too long: {len(text)} > {spec.max_text_chars} characters")
    s = text.strip()
    if not s:
        raise ActionError("empty action text")
    try:
        obj = json.loads(s, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except ActionError:
        raise
    except (ValueError, RecursionError, OverflowError) as e:  # JSONDecodeError, int digit limit, nesting
        raise ActionError(f"not a single valid JSON object: {str(e)[:120]}") from None
    if not isinstance(obj, dict):
        raise ActionError(f"action must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("action")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ActionError(f"unknown action {str(kind)[:40]!r}; allowed: {', '.join(KINDS)}")
    allowed = {
        "move": {"action", "linear_x", "angular_z", "duration"},
        "stop": {"action"},
        "look": {"action", "pan", "tilt"},
        "skill": {"action", "name"},
        "none": {"action"},
    }[kind]
    extra = set(obj) - allowed
    if extra:
        raise ActionError(f"unexpected fields for {kind!r}: {sorted(str(k)[:40] for k in extra)}")
    clamped: list[str] = []
    if kind == "move":
        return Action(
            "move",
            linear_x=_number(obj, "linear_x", spec.linear_x, clamped),
            angular_z=_number(obj, "angular_z", spec.angular_z, clamped),
            duration=_number(obj, "duration", spec.duration, clamped),
            clamped=tuple(clamped),
        )
    if kind == "look":
        return Action("look", pan=_number(obj, "pan", spec.pan, clamped), tilt=_number(obj, "tilt", spec.tilt, clamped),
                      clamped=tuple(clamped))
    if kind == "skill":
        name = obj.get("name")
        if not isinstance(name, str) or name not in spec.skills:
            raise ActionError(f"unknown skill {str(name)[:40]!r}; allowed: {', '.join(spec.skills) or '(none)'}")
        return Action("skill", name=name)
    return Action(kind)


class ActionValidator:
    """:func:`parse_action` plus counters (thread-safe), for diagnostics."""

    def __init__(self, spec: ActionSpec):
        self.spec = spec
        self._lock = threading.Lock()
        self.accepted = 0
        self.rejected = 0
        self.clamped = 0
        self.last_error = ""

    def validate(self, text: str) -> tuple[Action | None, str | None]:
        try:
            a = parse_action(text, self.spec)
        except ActionError as e:
            with self._lock:
                self.rejected += 1
                self.last_error = str(e)
            return None, str(e)
        with self._lock:
            self.accepted += 1
            if a.clamped:
                self.clamped += 1
        return a, None

    def refuse(self, reason: str) -> None:
        """Count a refusal that happened before parsing (e.g. no constraint available)."""
        with self._lock:
            self.rejected += 1
            self.last_error = reason

    def stats(self) -> dict:
        with self._lock:
            return {"accepted": self.accepted, "rejected": self.rejected, "clamped": self.clamped,
                    "last_error": self.last_error}


ZERO = (0.0, 0.0)


@dataclass
class MotionGate:
    """The only way to velocity commands: armed + validated + within limits + time-limited.

    ``command`` / ``tick`` / ``set_armed`` / ``stop`` return the (linear_x, angular_z) to publish now, or None
    for "publish nothing". While disarmed nothing but a single zero at the moment of disarming is ever returned.
    Times are monotonic seconds (motion durations are physical, even when the node runs on sim time).
    """

    spec: ActionSpec
    armed: bool = False
    _cmd: tuple[float, float] | None = None
    _deadline: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _needs_zero: bool = False  # something non-zero may be in effect downstream

    def set_armed(self, armed: bool, now: float) -> tuple[float, float] | None:
        with self._lock:
            was = self.armed
            self.armed = bool(armed)
            if was and not armed:
                self._cmd = None
                self._needs_zero = False
                return ZERO
            return None

    def command(self, action: Action, now: float) -> tuple[float, float] | None:
        if not action.moves_base:
            return None
        with self._lock:
            if not self.armed:
                return None
            if action.kind == "stop":
                self._cmd = None
                self._needs_zero = False
                return ZERO
            lx = self.spec.linear_x.clamp(float(action.linear_x))
            az = self.spec.angular_z.clamp(float(action.angular_z))
            dur = self.spec.duration.clamp(float(action.duration))
            if not (math.isfinite(lx) and math.isfinite(az) and math.isfinite(dur)):
                return None  # unreachable through parse_action; belt and braces
            self._cmd = (lx, az)
            self._deadline = now + dur
            self._needs_zero = True
            return self._cmd

    def tick(self, now: float) -> tuple[float, float] | None:
        """Watchdog step: zero once when the motion's duration has ended, else re-send the active command."""
        with self._lock:
            if self._cmd is None:
                return None
            if now >= self._deadline or not self.armed:
                self._cmd = None
                self._needs_zero = False
                return ZERO
            return self._cmd

    def stop(self, reason: str = "") -> tuple[float, float] | None:
        """Deactivate / error / session lost: zero if this node may have the robot moving (armed or moving)."""
        with self._lock:
            moving = self._cmd is not None or self._needs_zero
            self._cmd = None
            self._needs_zero = False
            return ZERO if (moving or self.armed) else None

    @property
    def active(self) -> bool:
        with self._lock:
            return self._cmd is not None

"""A procedural robot world: a seeded stream of 64x64 camera frames plus instructions with ground-truth answers.

The robot stands in a room and turns (piecewise constant angular velocity); now and then it moves on to the next
room. Each room holds a few objects (colour x shape, unique within the room) at fixed azimuths and depths; objects
also appear and leave on their own. A frame is the pinhole view of the heading (field of view +-HALF_FOV rad):
wall above the horizon, floor below, objects drawn far-to-near (so near ones occlude far ones), lighting that drifts
and per-pixel noise. Everything comes from one `numpy.random.Generator(PCG64(seed))`, so a seed is a stream.

Instructions come in three kinds (`KINDS`), each from a few templates with short canonical answers:
  current: "what is in front of you?" -> "a red ball" (the largest visible object), "what colour is the cube?",
           "where is the red ball?" -> "on the left" / "in the centre" / "on the right", "how many objects do you see?"
  past:    "what colour was the cube you saw?", "where did you last see the red ball?",
           "what appeared after the red cone?" (asked about things that are out of view now)
  action:  "go to the blue cube" / "stop" -> an action JSON in the vocabulary `ACTIONS` (see `action_for_target`):
           {"action": "move", "linear_x": 0.4, "angular_z": 0.5, "duration": 2.0} toward a visible target,
           {"action": "look", "pan": 0.8, "tilt": 0.0} toward the side it was last seen on, {"action": "stop"} else.
Every `Event` records the frame it is asked after and `distance`: frames between the evidence about the named object
and the question (0 for the current view, None where nothing was seen), for a recall-vs-distance benchmark.
Answers compare by exact match after `normalize_answer`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

H = W = 64
HORIZON = 28  # first floor row
HALF_FOV = 0.55  # rad, half the horizontal field of view
FPS = 2.0

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 45, 45), "green": (45, 170, 65), "blue": (45, 85, 215), "yellow": (225, 205, 45),
    "purple": (150, 65, 185),
}
SHAPES = ("cube", "ball", "cone")
WALLS = ((150, 150, 150), (172, 162, 142), (140, 150, 165), (160, 165, 150))  # low saturation
FLOORS = ((92, 86, 80), (112, 102, 92), (80, 86, 92), (100, 100, 100))
NEAR_DEPTHS, FAR_DEPTHS = (1.2, 1.9), (2.6, 3.6)  # metres; size and floor row follow depth
NEAR_LIMIT = 2.4
VISIBLE_FRACTION, VISIBLE_MIN_PX = 0.5, 12  # an object counts as seen when this much of it shows
POSITIONS = ("on the left", "in the centre", "on the right")
NUMBERS = ("none", "one", "two", "three", "four", "five")
KINDS = ("current", "past", "action")

# The action vocabulary: a subset of config/actions.yaml (same keys, same order, values inside its limits).
# linear_x m/s, angular_z rad/s (> 0 turns left, ROS REP 103), duration s; look: pan rad (> 0 left), tilt rad.
ACTIONS: dict[str, dict[str, tuple[float, float]]] = {
    "move": {"linear_x": (-0.2, 0.5), "angular_z": (-1.0, 1.0), "duration": (0.1, 3.0)},
    "stop": {},
    "look": {"pan": (-1.57, 1.57), "tilt": (-0.6, 0.6)},
}
GOTO_LINEAR = {"near": 0.2, "far": 0.4}
GOTO_ANGULAR = {"on the left": 0.5, "in the centre": 0.0, "on the right": -0.5}
GOTO_DURATION = 2.0
LOOK_PAN = {"on the left": 0.8, "on the right": -0.8}


@dataclass(frozen=True)
class ObjectView:
    """One object as it shows in one frame (only objects with at least one visible pixel are listed)."""

    id: int
    colour: str
    shape: str
    depth: float  # metres
    cx: float  # centroid column of the visible pixels
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of the visible pixels
    visible_px: int
    full_px: int  # area if nothing occluded it and the image were unbounded

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def distance(self) -> str:
        return "near" if self.depth < NEAR_LIMIT else "far"

    @property
    def position(self) -> str:
        return position_of(self.cx)

    @property
    def visible(self) -> bool:
        return self.visible_px >= VISIBLE_MIN_PX and self.visible_px >= VISIBLE_FRACTION * self.full_px

    @property
    def clear_position(self) -> bool:  # centroid not within 2 px of a third boundary
        return min(abs(self.cx - W / 3), abs(self.cx - 2 * W / 3)) >= 2.0


@dataclass
class Frame:
    index: int
    t: float
    rgb: np.ndarray  # (H, W, 3) uint8
    objects: list[ObjectView]
    room: int = 0
    heading: float = 0.0
    labels: np.ndarray | None = None  # (H, W) int8: index into `objects` of the object a pixel shows, -1 for none

    def seen(self) -> list[ObjectView]:
        return [o for o in self.objects if o.visible]


@dataclass(frozen=True)
class Event:
    frame: int  # asked right after this frame
    t: float
    kind: str  # one of KINDS
    template: str
    question: str
    answer: str
    distance: int | None  # frames between the evidence about the named object and the question
    seen_frame: int | None = None
    # the frame that shows the answer: seen_frame, except for "after" (the later frame where the next thing appeared)
    answer_frame: int | None = None


@dataclass
class Episode:
    seed: int
    fps: float
    frames: list[Frame]
    events: list[Event] = field(default_factory=list)


def position_of(cx: float) -> str:
    return POSITIONS[0] if cx < W / 3 else POSITIONS[2] if cx >= 2 * W / 3 else POSITIONS[1]


def _wrap(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


# ----------------------------------------------------------------------------------------------- rendering

_PAD = 32
_YY, _XX = np.mgrid[0:H, -_PAD:W + _PAD].astype(np.float32)  # rows in-frame, columns padded both sides
_YY = _YY + 0.5
_XX = _XX + 0.5


def _geometry(depth: float) -> tuple[float, float]:
    """(size in px, bottom row) of an object at `depth` metres."""
    return 27.0 / depth, HORIZON + 34.0 / depth


def shape_mask(shape: str, cx: float, depth: float) -> np.ndarray:
    """Boolean mask over the padded canvas (H, W + 2*_PAD); column j is image column j - _PAD."""
    s, bottom = _geometry(depth)
    if shape == "cube":
        return (np.abs(_XX - cx) <= s / 2) & (_YY >= bottom - s) & (_YY <= bottom)
    if shape == "ball":
        r = s / 2
        return (_XX - cx) ** 2 + (_YY - (bottom - r)) ** 2 <= r * r
    if shape == "cone":
        top = bottom - 1.2 * s
        half = (s / 2) * (_YY - top) / (bottom - top)
        return (_YY >= top) & (_YY <= bottom) & (np.abs(_XX - cx) <= half)
    raise ValueError(f"unknown shape {shape!r}")


@dataclass
class _Obj:
    id: int
    colour: str
    shape: str
    az: float  # world azimuth, rad
    depth: float


@dataclass
class _Room:
    index: int
    wall: tuple[int, int, int]
    floor: tuple[int, int, int]
    objects: list[_Obj]


def render(room: _Room, heading: float, light: float, noise: float, rng: np.random.Generator):
    """(rgb uint8, object views sorted by centroid column, (H, W) int8 map of the view index each pixel shows or -1)
    for `heading`; `rng` draws the pixel noise only."""
    img = np.empty((H, W, 3), np.float32)
    ramp = np.linspace(1.05, 0.95, H, dtype=np.float32)[:, None, None]
    img[:HORIZON] = np.asarray(room.wall, np.float32)
    img[HORIZON:] = np.asarray(room.floor, np.float32)
    img *= ramp
    label = np.full((H, W + 2 * _PAD), -1, np.int32)
    full: dict[int, int] = {}
    order = sorted(room.objects, key=lambda o: -o.depth)  # far first, near ones overwrite
    canvas = np.broadcast_to(img[:, :1], (H, W + 2 * _PAD, 3)).copy()
    canvas[:, _PAD:_PAD + W] = img
    for k, ob in enumerate(order):
        rel = _wrap(ob.az - heading)
        if abs(rel) > HALF_FOV * 1.8:
            continue
        cx = W / 2 - rel / HALF_FOV * (W / 2)
        mask = shape_mask(ob.shape, cx, ob.depth)
        full[k] = int(mask.sum())
        label[mask] = k
        colour = np.asarray(COLOURS[ob.colour], np.float32)
        shade = np.ones((H, W + 2 * _PAD, 1), np.float32)
        if ob.shape == "cube":  # lit top face
            s, bottom = _geometry(ob.depth)
            shade[(_YY < bottom - 0.75 * s)] = 1.12
        elif ob.shape == "ball":  # darker lower half
            s, bottom = _geometry(ob.depth)
            shade[(_YY > bottom - s / 2)] = 0.88
        canvas[mask] = np.clip(colour * shade[mask], 0, 255)
    img = canvas[:, _PAD:_PAD + W] * light
    img += rng.normal(0.0, noise, img.shape).astype(np.float32)
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    views = []
    inner = label[:, _PAD:_PAD + W]
    for k, ob in enumerate(order):
        if k not in full:
            continue
        ys, xs = np.nonzero(inner == k)
        if len(xs) == 0:
            continue
        views.append(((ys, xs), ObjectView(id=ob.id, colour=ob.colour, shape=ob.shape, depth=ob.depth,
                                           cx=float(xs.mean() + 0.5),
                                           bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                                           visible_px=len(xs), full_px=full[k])))
    views.sort(key=lambda pv: pv[1].cx)
    labels = np.full((H, W), -1, np.int8)
    for i, (pixels, _) in enumerate(views):
        labels[pixels] = i
    return rgb, [v for _, v in views], labels


# ----------------------------------------------------------------------------------------------- the world


class World:
    """A seeded robot world. `stream(n, fps)` yields the same frames for the same seed, every time."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def _new_room(self, rng: np.random.Generator, index: int, next_id: list[int]) -> _Room:
        room = _Room(index, WALLS[rng.integers(len(WALLS))], FLOORS[rng.integers(len(FLOORS))], [])
        for _ in range(int(rng.integers(5, 9))):
            self._add_object(rng, room, next_id)
        if rng.random() < 0.5 and room.objects:  # an occlusion pair: a far object just behind a near one
            front = room.objects[int(rng.integers(len(room.objects)))]
            if front.depth < NEAR_LIMIT:
                self._add_object(rng, room, next_id, az=_wrap(front.az + rng.uniform(-0.15, 0.15)), far=True)
        return room

    def _add_object(self, rng, room: _Room, next_id: list[int], az: float | None = None, far: bool | None = None):
        used = {(o.colour, o.shape) for o in room.objects}
        free = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in used]
        colour, shape = free[int(rng.integers(len(free)))]
        behind = az is not None
        if az is None:
            for _ in range(50):
                az = float(rng.uniform(-math.pi, math.pi))
                if all(abs(_wrap(az - o.az)) >= 0.35 for o in room.objects):
                    break
            else:
                return
        if far is None:
            far = bool(rng.random() < 0.5)
        depth = float(rng.uniform(*(FAR_DEPTHS if far else NEAR_DEPTHS)))
        # at most 3 objects in any field of view (4 with an occlusion pair): check each window starting at a member
        cand = room.objects + [_Obj(next_id[0], colour, shape, az, depth)]
        for o in cand:
            if sum(0 <= _wrap(p.az - o.az) <= 2.2 * HALF_FOV for p in cand) > 3 + (1 if behind else 0):
                return
        room.objects.append(cand[-1])
        next_id[0] += 1

    def stream(self, n_frames: int, fps: float = FPS) -> Iterator[Frame]:
        rng = np.random.Generator(np.random.PCG64(self.seed))
        next_id = [0]
        room = self._new_room(rng, 0, next_id)
        heading = float(rng.uniform(-math.pi, math.pi))
        omega, seg_left = 0.0, 0.0
        room_left = float(rng.uniform(8, 20))
        phase, period = float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(5, 12))
        noise = float(rng.uniform(2.0, 6.0))
        dt = 1.0 / fps
        for i in range(n_frames):
            t = i * dt
            light = 1.0 + 0.08 * math.sin(2 * math.pi * t / period + phase) + float(rng.normal(0, 0.015))
            rgb, views, labels = render(room, heading, light, noise, rng)
            yield Frame(index=i, t=round(t, 3), rgb=rgb, objects=views, room=room.index, heading=heading,
                        labels=labels)
            # advance the world by one frame
            seg_left -= dt
            if seg_left <= 0:
                omega = float(rng.choice([-0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6]))
                seg_left = float(rng.uniform(1.0, 4.0))
            heading = _wrap(heading + omega * dt)
            room_left -= dt
            if room_left <= 0:  # the robot drives on to the next room
                room = self._new_room(rng, room.index + 1, next_id)
                heading = float(rng.uniform(-math.pi, math.pi))
                room_left = float(rng.uniform(8, 20))
            elif rng.random() < 0.03 and len(room.objects) > 1:  # someone takes an object away
                room.objects.pop(int(rng.integers(len(room.objects))))
            elif rng.random() < 0.03:  # someone puts a new one down
                self._add_object(rng, room, next_id)


# ----------------------------------------------------------------------------------------------- answers


def article(name: str) -> str:
    return "a " + name


def format_action(action: dict) -> str:
    """Canonical JSON: "action" first, then the parameters in vocabulary order, as floats."""
    kind = action["action"]
    return json.dumps({"action": kind, **{key: float(action[key]) for key in ACTIONS[kind]}})


def validate_action(action: dict | str) -> dict:
    """Parse and check an action against `ACTIONS`; raise ValueError when it is not in the vocabulary."""
    if isinstance(action, str):
        try:
            action = json.loads(action)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {action!r}") from e
    if not isinstance(action, dict) or action.get("action") not in ACTIONS:
        raise ValueError(f"unknown action in {action!r}; vocabulary: {sorted(ACTIONS)}")
    spec = ACTIONS[action["action"]]
    if set(action) != {"action", *spec}:
        raise ValueError(f"{action['action']} takes exactly {sorted(spec)}, got {sorted(set(action) - {'action'})}")
    for key, (lo, hi) in spec.items():
        value = action[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise ValueError(f"{key}={value!r} outside [{lo}, {hi}]")
    return action


def action_for_target(view: ObjectView | None, last_position: str | None) -> dict:
    """The action for "go to the X": drive toward it when it is in view, look where it was last seen, else stop."""
    if view is not None:
        return {"action": "move", "linear_x": GOTO_LINEAR[view.distance], "angular_z": GOTO_ANGULAR[view.position],
                "duration": GOTO_DURATION}
    if last_position in LOOK_PAN:
        return {"action": "look", "pan": LOOK_PAN[last_position], "tilt": 0.0}
    return {"action": "stop"}


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation, no leading article; action JSON in canonical form."""
    s = " ".join(str(text).strip().lower().split())
    if s.startswith("{"):
        try:
            return format_action(validate_action(s))
        except (ValueError, KeyError):
            return s
    s = s.rstrip(".!?").strip()
    return re.sub(r"^(a|an|the) ", "", s)


# ----------------------------------------------------------------------------------------------- questions


class _History:
    """Per-frame lookups over frames[0..now] for one question."""

    def __init__(self, frames: list[Frame], now: int):
        self.frames, self.now = frames, now
        self.cur = frames[now]

    def current(self, pred) -> list[ObjectView]:
        return [o for o in self.cur.objects if pred(o)]

    def last_seen(self, pred) -> tuple[int, list[ObjectView]] | None:
        """The latest frame before now where some object matching `pred` was seen, and those objects."""
        for i in range(self.now - 1, -1, -1):
            hits = [o for o in self.frames[i].seen() if pred(o)]
            if hits:
                return i, hits
        return None

    def appearances(self) -> list[tuple[int, ObjectView]]:
        """(frame, object) where an object is seen and was not seen in the frame before."""
        out, before = [], set()
        for i in range(self.now + 1):
            seen = {o.id: o for o in self.frames[i].seen()}
            out += [(i, o) for oid, o in seen.items() if oid not in before]
            before = set(seen)
        return out


def _q_in_front(h: _History, rng):
    seen = sorted(h.cur.objects, key=lambda o: -o.visible_px)
    if not seen or not seen[0].visible or (len(seen) > 1 and seen[0].visible_px < 1.5 * seen[1].visible_px):
        return None
    return "what is in front of you?", article(seen[0].name), h.now


def _q_colour_now(h: _History, rng):
    shapes = [s for s in SHAPES if len(h.current(lambda o, s=s: o.shape == s)) == 1
              and h.current(lambda o, s=s: o.shape == s)[0].visible]
    if not shapes:
        return None
    shape = shapes[int(rng.integers(len(shapes)))]
    return f"what colour is the {shape}?", h.current(lambda o: o.shape == shape)[0].colour, h.now


def _q_where_now(h: _History, rng):
    cands = [o for o in h.cur.seen() if o.clear_position]
    if not cands:
        return None
    o = cands[int(rng.integers(len(cands)))]
    return f"where is the {o.name}?", o.position, h.now


def _q_count(h: _History, rng):
    if any(not o.visible for o in h.cur.objects):  # a sliver or a hidden object makes the count ambiguous
        return None
    return "how many objects do you see?", NUMBERS[len(h.cur.objects)], h.now


def _q_colour_past(h: _History, rng):
    shapes = [s for s in SHAPES if not h.current(lambda o, s=s: o.shape == s)]
    rng.shuffle(shapes)
    for shape in shapes:
        hit = h.last_seen(lambda o, s=shape: o.shape == s)
        if hit and len(hit[1]) == 1:
            return f"what colour was the {shape} you saw?", hit[1][0].colour, hit[0]
    return None


def _q_where_past(h: _History, rng):
    names = sorted({o.name for f in h.frames[:h.now] for o in f.seen()} - {o.name for o in h.cur.objects})
    rng.shuffle(names)
    for name in names:
        i, hits = h.last_seen(lambda o, n=name: o.name == n)
        if len(hits) == 1 and hits[0].clear_position:
            return f"where did you last see the {name}?", hits[0].position, i
    return None


def _q_after(h: _History, rng):
    apps = h.appearances()
    frames_of = {}
    for i, o in apps:
        frames_of.setdefault(i, []).append(o)
    cands = []
    for k, (i, o) in enumerate(apps):
        later = [(j, p) for j, p in apps[k + 1:] if j > i and p.name != o.name]
        if not later or len(frames_of[i]) > 1:
            continue
        j = later[0][0]
        if len(frames_of[j]) > 1 or any(p.name == o.name for jj, p in apps if jj > i):
            continue  # two things appeared at once, or o appeared again later: ambiguous
        cands.append((i, o, later[0][1], j))
    if not cands:
        return None
    i, o, nxt, j = cands[int(rng.integers(len(cands)))]
    return f"what appeared after the {o.name}?", article(nxt.name), i, j


def _goto(h: _History, rng):
    names = sorted({o.name for f in h.frames[:h.now + 1] for o in f.seen()})
    pool = names + [f"{c} {s}" for c in COLOURS for s in SHAPES]  # seen things mostly, sometimes anything
    name = (names[int(rng.integers(len(names)))] if names and rng.random() < 0.8
            else pool[int(rng.integers(len(pool)))])
    now = [o for o in h.cur.objects if o.name == name]
    if now:
        if not (now[0].visible and now[0].clear_position):
            return None
        return f"go to the {name}", format_action(action_for_target(now[0], None)), h.now
    hit = h.last_seen(lambda o: o.name == name)
    if hit is None:
        return f"go to the {name}", format_action(action_for_target(None, None)), None
    if len(hit[1]) != 1 or not hit[1][0].clear_position:
        return None
    return f"go to the {name}", format_action(action_for_target(None, hit[1][0].position)), hit[0]


def _stop(h: _History, rng):
    return "stop", format_action({"action": "stop"}), None


TEMPLATES = {
    "current": {"in_front": _q_in_front, "colour_now": _q_colour_now, "where_now": _q_where_now, "count": _q_count},
    "past": {"colour_past": _q_colour_past, "where_past": _q_where_past, "after": _q_after},
    "action": {"goto": _goto, "goto_": _goto, "goto__": _goto, "stop": _stop},  # goto 3x as likely as stop
}


def ask(frames: list[Frame], now: int, kind: str, rng: np.random.Generator) -> Event | None:
    """One question of `kind` after frame `now`, or None when no template of that kind applies there."""
    h = _History(frames, now)
    names = list(TEMPLATES[kind])
    rng.shuffle(names)
    for name in names:
        got = TEMPLATES[kind][name](h, rng)
        if got is not None:
            question, answer, seen, *shown = got  # after: + the frame showing the answer
            return Event(frame=now, t=frames[now].t, kind=kind, template=name.rstrip("_"), question=question,
                         answer=answer, distance=None if seen is None else now - seen, seen_frame=seen,
                         answer_frame=shown[0] if shown else seen)
    return None


def make_episode(seed: int, n_frames: int, n_questions: int, fps: float = FPS,
                 kinds: tuple[str, ...] = KINDS) -> Episode:
    """A stream of `n_frames` and up to `n_questions` events (kinds in turn), sorted by frame."""
    frames = list(World(seed).stream(n_frames, fps))
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    order = list(kinds)
    rng.shuffle(order)
    events = []
    for q in range(n_questions):
        kind = order[q % len(order)]
        for _ in range(20):
            ev = ask(frames, int(rng.integers(n_frames)), kind, rng)
            if ev is not None:
                events.append(ev)
                break
    events.sort(key=lambda e: e.frame)
    return Episode(seed=seed, fps=fps, frames=frames, events=events)


def vocabulary() -> list[str]:
    """Every question and answer string the world can produce (a tokenizer's training corpus)."""
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    out = ["what is in front of you?", "how many objects do you see?", "stop"]
    out += [f"what colour is the {s}?" for s in SHAPES] + [f"what colour was the {s} you saw?" for s in SHAPES]
    for n in names:
        out += [f"where is the {n}?", f"where did you last see the {n}?", f"what appeared after the {n}?",
                f"go to the {n}", article(n)]
    out += list(COLOURS) + list(POSITIONS) + list(NUMBERS)
    for lin in GOTO_LINEAR.values():
        for ang in GOTO_ANGULAR.values():
            out.append(format_action({"action": "move", "linear_x": lin, "angular_z": ang, "duration": GOTO_DURATION}))
    out += [format_action({"action": "look", "pan": pan, "tilt": 0.0}) for pan in LOOK_PAN.values()]
    out.append(format_action({"action": "stop"}))
    return out

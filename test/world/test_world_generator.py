"""The procedural robot world: determinism, answers true to the rendered pixels, distances, action vocabulary."""

import json

import numpy as np
import pytest

from infmllm_ros import world
from infmllm_ros.world import Frame, ObjectView

SEEDS = range(40)


def _episodes():
    return [world.make_episode(s, 24, 12) for s in SEEDS]


@pytest.fixture(scope="module")
def episodes():
    return _episodes()


# ----------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_stream():
    a, b = world.make_episode(7, 30, 10), world.make_episode(7, 30, 10)
    assert len(a.frames) == len(b.frames) == 30
    for fa, fb in zip(a.frames, b.frames, strict=True):
        assert fa.t == fb.t and fa.objects == fb.objects
        assert np.array_equal(fa.rgb, fb.rgb)
    assert a.events == b.events and len(a.events) >= 5


def test_different_seeds_differ():
    a, b = world.make_episode(7, 30, 10), world.make_episode(8, 30, 10)
    assert not np.array_equal(np.stack([f.rgb for f in a.frames]), np.stack([f.rgb for f in b.frames]))
    assert [e.question for e in a.events] != [e.question for e in b.events]


def test_stream_prefix_does_not_depend_on_length():
    short = list(world.World(3).stream(10))
    long = list(world.World(3).stream(25))
    assert all(np.array_equal(s.rgb, t.rgb) for s, t in zip(short, long[:10], strict=True))


def test_frames_shape_and_motion(episodes):
    f = episodes[0].frames[0]
    assert f.rgb.shape == (64, 64, 3) and f.rgb.dtype == np.uint8
    counts = [len(fr.seen()) for ep in episodes for fr in ep.frames]
    assert max(counts) <= 3 and np.mean([c >= 1 for c in counts]) > 0.7
    # objects come and go: the set of seen objects changes inside most episodes
    ids = [[{o.id for o in f.seen()} for f in ep.frames] for ep in episodes]
    changes = [sum(a != b for a, b in zip(s[:-1], s[1:], strict=True)) for s in ids]
    assert np.mean([c > 0 for c in changes]) > 0.8


def test_every_kind_and_template_occurs(episodes):
    seen = {(e.kind, e.template) for ep in episodes for e in ep.events}
    want = {(k, t.rstrip("_")) for k, ts in world.TEMPLATES.items() for t in ts}
    assert seen == want


# ----------------------------------------------------------------------------------------------- answers vs pixels

_PALETTE = np.array([world.COLOURS[c] for c in world.COLOURS], np.float32)
_CHROMA = _PALETTE / _PALETTE.sum(1, keepdims=True)


def _colour_classes(rgb: np.ndarray) -> np.ndarray:
    """Per pixel: index into COLOURS by nearest chromaticity, or -1 for grey-ish background (wall/floor)."""
    x = rgb.astype(np.float32)
    sat = (x.max(-1) - x.min(-1)) / np.maximum(x.max(-1), 1)
    chroma = x / np.maximum(x.sum(-1, keepdims=True), 1)
    cls = np.argmin(((chroma[..., None, :] - _CHROMA) ** 2).sum(-1), -1)
    return np.where(sat > 0.35, cls, -1)


def _name_in(frame: Frame, answer: str) -> ObjectView:
    name = world.normalize_answer(answer)
    (view,) = [o for o in frame.objects if o.name == name]
    return view


def test_current_view_answers_match_pixels(episodes):
    names = list(world.COLOURS)
    checked = 0
    for ep in episodes:
        for e in ep.events:
            frame = ep.frames[e.frame]
            cls = _colour_classes(frame.rgb)
            if e.template == "in_front":
                view = _name_in(frame, e.answer)
            elif e.template == "colour_now":
                shape = e.question.split()[-1].rstrip("?")
                (view,) = [o for o in frame.objects if o.shape == shape]
                assert view.colour == e.answer
            elif e.template == "where_now":
                view = _name_in(frame, e.question[len("where is the "):-1])
            else:
                continue
            x0, y0, x1, y1 = view.bbox
            region = cls[y0:y1, x0:x1]
            coloured = region[region >= 0]
            # the dominant non-background colour where the object was drawn is the object's colour
            assert names[np.bincount(coloured, minlength=len(names)).argmax()] == view.colour, e
            if e.template == "where_now":
                ys, xs = np.nonzero(region == names.index(view.colour))
                assert world.position_of(xs.mean() + x0 + 0.5) == e.answer, e
            if e.template == "in_front" and len({o.colour for o in frame.objects}) == len(frame.objects):
                # the named object is the biggest coloured blob in the whole frame
                total = np.bincount(cls[cls >= 0], minlength=len(names))
                assert names[total.argmax()] == view.colour, e
            checked += 1
    assert checked >= 60


def test_pixel_labels_agree_with_views_and_pixels(episodes):
    names = list(world.COLOURS)
    for ep in episodes[:10]:
        for frame in ep.frames:
            assert frame.labels.shape == (world.H, world.W) and frame.labels.min() >= -1
            assert frame.labels.max() < len(frame.objects)
            for i, view in enumerate(frame.objects):
                ys, xs = np.nonzero(frame.labels == i)
                assert len(xs) == view.visible_px and abs(xs.mean() + 0.5 - view.cx) < 1e-6
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == view.bbox
            # read back from the pixels: labelled pixels show their object's colour, unlabelled ones are grey
            cls = _colour_classes(frame.rgb)
            labelled = frame.labels >= 0
            if labelled.any():
                want = np.array([names.index(o.colour) for o in frame.objects])[frame.labels[labelled]]
                assert (cls[labelled] == want).mean() > 0.95
            assert (cls[~labelled] == -1).mean() > 0.95


def test_count_answers_match_views(episodes):
    for ep in episodes:
        for e in ep.events:
            if e.template == "count":
                frame = ep.frames[e.frame]
                assert world.NUMBERS.index(e.answer) == len(frame.seen()) == len(frame.objects)


def test_after_answers_point_at_the_frame_showing_them(episodes):
    n = 0
    for ep in episodes:
        for e in ep.events:
            if e.template != "after":
                assert e.answer_frame == e.seen_frame
                continue
            name = e.question[len("what appeared after the "):-1]
            i, j = e.seen_frame, e.answer_frame
            assert i < j <= e.frame
            assert name in {o.name for o in ep.frames[i].seen()}
            (new,) = [o for o in ep.frames[j].seen() if o.id not in {p.id for p in ep.frames[j - 1].seen()}]
            assert world.article(new.name) == e.answer  # appeared in frame j, the first new thing since frame i
            n += 1
    assert n >= 5


def test_past_answers_point_at_their_evidence(episodes):
    n = 0
    for ep in episodes:
        for e in ep.events:
            assert e.distance == (None if e.seen_frame is None else e.frame - e.seen_frame)
            if e.template not in ("colour_past", "where_past"):
                continue
            assert e.distance >= 1
            if e.template == "where_past":
                name = e.question[len("where did you last see the "):-1]
                match = lambda o, n=name: o.name == n  # noqa: B023
            else:
                shape = e.question.split()[4]
                match = lambda o, s=shape: o.shape == s  # noqa: B023
            (hit,) = [o for o in ep.frames[e.seen_frame].seen() if match(o)]
            assert (hit.position if e.template == "where_past" else hit.colour) == e.answer
            for f in ep.frames[e.seen_frame + 1:e.frame + 1]:  # not seen since
                assert not [o for o in f.seen() if match(o)]
            assert not [o for o in ep.frames[e.frame].objects if match(o)]
            n += 1
    assert n >= 20


# ----------------------------------------------------------------------------------------------- constructed stream


def _view(name: str, cx: float, oid: int, px: int = 100, depth: float = 1.5) -> ObjectView:
    colour, shape = name.split()
    return ObjectView(id=oid, colour=colour, shape=shape, depth=depth, cx=cx, bbox=(0, 0, 1, 1), visible_px=px,
                      full_px=px)


def _constructed() -> list[Frame]:
    """Frames 0-2: red ball on the left; 4-5: blue cube on the right (far); 6-7: yellow cone in the centre."""
    blank = np.zeros((64, 64, 3), np.uint8)
    layout = {0: ["red ball"], 1: ["red ball"], 2: ["red ball"], 3: [], 4: ["blue cube"], 5: ["blue cube"],
              6: ["yellow cone"], 7: ["yellow cone"]}
    where = {"red ball": (10.0, 1.5, 1), "blue cube": (55.0, 3.0, 2), "yellow cone": (32.0, 1.5, 3)}
    return [Frame(i, i / 2, blank, [_view(n, where[n][0], where[n][2], depth=where[n][1]) for n in names])
            for i, names in layout.items()]


def _run(kind: str, template: str, now: int, seed: int = 0):
    return world.TEMPLATES[kind][template](world._History(_constructed(), now), np.random.default_rng(seed))


def test_distances_on_constructed_stream():
    assert _run("past", "where_past", 7) in [("where did you last see the red ball?", "on the left", 2),
                                             ("where did you last see the blue cube?", "on the right", 5)]
    for seed in range(10):
        q, a, seen = _run("past", "where_past", 7, seed)
        ev_distance = 7 - seen
        assert (a, ev_distance) == (("on the left", 5) if "red ball" in q else ("on the right", 2))
    assert _run("past", "colour_past", 3, 0) == ("what colour was the ball you saw?", "red", 2)
    got = _run("past", "after", 7)  # + the frame that shows the answer: where the next thing appeared
    assert got in [("what appeared after the red ball?", "a blue cube", 0, 4),
                   ("what appeared after the blue cube?", "a yellow cone", 4, 6)]
    assert _run("current", "in_front", 7) == ("what is in front of you?", "a yellow cone", 7)
    assert _run("current", "where_now", 5) == ("where is the blue cube?", "on the right", 5)
    assert _run("current", "count", 3) == ("how many objects do you see?", "none", 3)
    ev = world.ask(_constructed(), 7, "current", np.random.default_rng(0))
    assert ev.distance == 0 and ev.seen_frame == 7


def test_goto_actions_on_constructed_stream():
    frames = _constructed()
    for seed in range(40):
        q, a, seen = world.TEMPLATES["action"]["goto"](world._History(frames, 7), np.random.default_rng(seed))
        act = json.loads(a)
        if q == "go to the yellow cone":  # in view, centre, near
            assert act == {"action": "move", "linear_x": 0.2, "angular_z": 0.0, "duration": 2.0} and seen == 7
        elif q == "go to the red ball":  # last seen on the left at frame 2
            assert act == {"action": "look", "pan": 0.8, "tilt": 0.0} and 7 - seen == 5
        elif q == "go to the blue cube":  # last seen on the right at frame 5
            assert act == {"action": "look", "pan": -0.8, "tilt": 0.0} and 7 - seen == 2
        else:  # never seen
            assert act == {"action": "stop"} and seen is None
    q, a, seen = world.TEMPLATES["action"]["goto"](world._History(frames, 5), np.random.default_rng(1))
    view = world.action_for_target(frames[5].objects[0], None)
    assert view == {"action": "move", "linear_x": 0.4, "angular_z": -0.5, "duration": 2.0}  # far, on the right


# ----------------------------------------------------------------------------------------------- actions + answers


def test_action_answers_are_valid(episodes):
    n = 0
    for ep in episodes:
        for e in ep.events:
            if e.kind != "action":
                continue
            act = world.validate_action(e.answer)
            assert world.format_action(act) == e.answer  # canonical form
            if act["action"] == "move":
                view = _name_in(ep.frames[e.frame], e.question[len("go to the "):])
                assert np.sign(act["angular_z"]) == {"on the left": 1, "in the centre": 0, "on the right": -1}[
                    view.position]
            n += 1
    assert n >= 60


@pytest.mark.parametrize("bad", [
    '{"action": "fly"}', '{"action": "move", "linear_x": 2.0, "angular_z": 0.0, "duration": 1.0}',
    '{"action": "move", "linear_x": 0.1, "angular_z": 0.0}', '{"action": "stop", "now": true}',
    '{"action": "look", "pan": "left", "tilt": 0.0}', "go left", '{"action": "move", "linear_x": true, '
    '"angular_z": 0.0, "duration": 1.0}'])
def test_invalid_actions_are_rejected(bad):
    with pytest.raises(ValueError):
        world.validate_action(bad)


def test_vocabulary_fits_actions_yaml_limits():
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "config" / "actions.yaml"
    if not path.exists():
        pytest.skip("config/actions.yaml not present")
    spec = yaml.safe_load(path.read_text())
    for kind, params in world.ACTIONS.items():
        for key, (lo, hi) in params.items():
            assert spec[kind][key]["min"] <= lo and hi <= spec[kind][key]["max"], (kind, key)


def test_normalize_answer():
    n = world.normalize_answer
    assert n("A red ball.") == n("red ball") == n(" the  RED ball ") == "red ball"
    assert n('{"action":"stop"}') == n('{"action": "stop"}')
    assert n('{"duration": 2, "angular_z": 0.5, "linear_x": 0.2, "action": "move"}') == \
        '{"action": "move", "linear_x": 0.2, "angular_z": 0.5, "duration": 2.0}'
    assert n("on the left") != n("on the right")
    assert n("{broken") == "{broken"


def test_in_front_is_the_biggest_visible_object():
    blank = np.zeros((64, 64, 3), np.uint8)
    frame = Frame(0, 0.0, blank, [_view("red ball", 12.0, 1, px=40, depth=3.0), _view("blue cube", 50.0, 2, px=300)])
    assert world.TEMPLATES["current"]["in_front"](world._History([frame], 0), np.random.default_rng(0)) == \
        ("what is in front of you?", "a blue cube", 0)
    frame.objects[0] = _view("red ball", 12.0, 1, px=250)  # about as big: ambiguous, not asked
    assert world.TEMPLATES["current"]["in_front"](world._History([frame], 0), np.random.default_rng(0)) is None


def test_turning_left_moves_objects_right(episodes):
    """Angular > 0 turns left (REP 103), so the scene slides right: "go to" a thing on the left turns left."""
    room = world._Room(0, world.WALLS[0], world.FLOORS[0], [world._Obj(0, "red", "cube", 0.0, 1.5)])
    rng = np.random.default_rng(0)
    (ahead,), (after_left,) = (world.render(room, h, 1.0, 0.0, rng)[1] for h in (0.0, 0.15))
    assert abs(ahead.cx - 32) < 1 and after_left.cx > ahead.cx + 5 and after_left.position == "in the centre"
    pairs = 0
    for ep in episodes:
        for a, b in zip(ep.frames[:-1], ep.frames[1:], strict=True):
            dh = world._wrap(b.heading - a.heading)
            for o in a.seen():
                same = [p for p in b.seen() if p.id == o.id and a.room == b.room]
                if same and abs(dh) > 0.05 and 8 < o.cx < 56 and 8 < same[0].cx < 56:
                    assert np.sign(same[0].cx - o.cx) == np.sign(dh)
                    pairs += 1
    assert pairs > 50

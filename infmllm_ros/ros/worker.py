"""The worker: ONE thread that owns the session, with a one-slot frame mailbox (latest frame wins) and a bounded
instruction queue. It observes at most ``frame_rate`` frames per second, answers instructions in arrival order
(observing the newest pending frame first, so answers see the freshest view), runs resets and ``~/save``
snapshots (between two steps, never during a forward), and hands answers and actions to outputs and motion. No
other thread calls into the session; diagnostics read ``session_stats`` (and ``archive_stats``), copies the
worker takes after each step. At configure, ``memory.restore`` resumes the session from ``memory.snapshot``."""

from __future__ import annotations

import collections
import sys
import threading
import time
import traceback

import numpy as np
from std_msgs.msg import String

from infmllm_ros.actions import Action, ActionConstraint, ActionSpec, ActionValidator
from infmllm_ros.ros import session_factory as sf
from infmllm_ros.ros.snapshots import Snapshots

SESSION_METHODS = ("observe", "ask", "reset", "stats")


def _archive_of(session):
    """The session's frame archive: `session.recall.archive` (memory/recall.py), else `session.archive`, else None
    (as engine/snapshot_archive.archive_of; not imported from there: that would load torch for any session)."""
    recall = getattr(session, "recall", None)
    if recall is not None and hasattr(recall, "archive"):
        return recall.archive
    return getattr(session, "archive", None)


class Cancelled(Exception):
    """Raised from on_token to abandon a generation (reset requested or node deactivating)."""


class Worker:
    def __init__(self, node):
        self.node = node
        self.stats = node.stats
        self.cv = threading.Condition()
        self.frame = None  # (rgb view, stamp_s, header stamp, t_received)
        self.instructions: collections.deque = collections.deque()
        self.reset_events: list[threading.Event] = []
        self.save_events: list[threading.Event] = []
        self.stop_flag = False
        self.cancel = threading.Event()
        self.thread: threading.Thread | None = None
        self.session = None
        self.session_lost = False
        self.busy_since = 0.0
        self.session_stats: dict = {}
        self.frame_received = None  # monotonic arrival time of the newest frame the session observed
        self.spec: ActionSpec | None = None
        self.validator: ActionValidator | None = None
        self.constraint: ActionConstraint | None = None
        self.constraint_error = ""
        self.snapshots = Snapshots(self)  # ~/save and memory.restore
        self.archive_stats: dict = {}  # session.archive.stats() after each step (diagnostics)

    @property
    def p(self) -> dict:
        return self.node.p

    # ------------------------------------------------------------------------------------------------ ownership
    def build(self, p: dict, spec: ActionSpec):
        """Build the session (configure). Raises with the reason if the factory fails or returns no session."""
        self.spec = spec
        self.validator = ActionValidator(spec)
        session = sf.load_factory(p["session_factory"])(dict(p))
        missing = [m for m in SESSION_METHODS if not callable(getattr(session, m, None))]
        if missing:
            raise TypeError(f"session_factory {p['session_factory'] or 'make_session'!r} returned "
                            f"{type(session).__name__}, which lacks {', '.join(missing)}")
        self.session = session
        self.build_constraint()
        self.snapshots.restore()

    def build_constraint(self):
        log = self.node.get_logger()
        self.constraint, self.constraint_error = None, ""
        if self.p["actions.mode"] == "off":
            return
        tok = sf.tokenizer_of(self.session)
        if tok is None:
            self.constraint_error = "the session exposes no tokenizer"
        else:
            try:
                t0 = time.monotonic()
                self.constraint = ActionConstraint(self.spec, tok, backend=self.p.get("actions.grammar", "auto"))
                log.info(f"action constraint ({self.constraint.backend}) ready in {time.monotonic() - t0:.2f} s "
                         f"{self.constraint.fallback_reason}")
            except Exception as e:
                self.constraint_error = f"{type(e).__name__}: {e}"
        if self.constraint is None:
            log.warning(f"constrained action decoding unavailable ({self.constraint_error}): "
                        "every action request will be refused (fail closed)")

    def start(self):
        self.stop_flag = False
        self.session_lost = False
        self.thread = threading.Thread(target=self.main, name="infmllm_session", daemon=True)
        self.thread.start()

    def dead(self) -> bool:
        return self.thread is not None and not self.thread.is_alive() and not self.stop_flag

    def stop(self):
        with self.cv:
            self.stop_flag = True
            self.cancel.set()
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30.0)
            if self.thread.is_alive():
                self.node.get_logger().error("worker thread did not stop within 30 s (a generation is stuck)")
        self.thread = None
        self.cancel.clear()

    def release(self):
        s, self.session = self.session, None
        self.constraint = None
        if s is None:
            return
        close = getattr(s, "close", None)
        if callable(close):
            try:
                close()
            except Exception as e:
                self.node.get_logger().warning(f"session close: {e}")
        del s
        import gc

        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------------ mailboxes
    def put_frame(self, item):
        with self.cv:
            if self.frame is not None:
                self.stats.inc("frames_dropped")
            self.frame = item
            self.cv.notify()
        self.stats.inc("frames_in")

    def wake(self):
        with self.cv:
            self.cv.notify()

    def put_instruction(self, text: str, image_seq: int = 0):
        """Queue an instruction; ``image_seq``: the newest image message received before it (see inputs.py)."""
        with self.cv:
            if len(self.instructions) >= int(self.p["instruction_depth"]):
                self.instructions.popleft()
                self.stats.inc("instructions_dropped")
                self.node.get_logger().warning("instruction queue full: dropped the oldest instruction")
            self.instructions.append((text, time.monotonic(), image_seq))
            self.cv.notify()
        self.stats.inc("instructions_in")

    def drop_pending(self):
        with self.cv:
            if self.frame is not None:
                self.stats.inc("frames_dropped")
            self.frame = None
            self.stats.inc("instructions_dropped", len(self.instructions))
            self.instructions.clear()

    def request_reset(self, timeout: float) -> tuple[bool, str]:
        if self.session is None or self.thread is None:
            return False, "not configured"
        ev = threading.Event()
        ev.ok = False
        with self.cv:
            self.reset_events.append(ev)
            self.cancel.set()  # abandon a running generation: the context it belongs to is being dropped
            self.cv.notify_all()
        if ev.wait(timeout):
            return bool(ev.ok), "session reset" if ev.ok else f"reset failed: {self.stats.last_error}"
        return False, "reset pending: the worker is busy; it will run next"

    # ------------------------------------------------------------------------------------------------ the loop
    def snapshot_stats(self):
        try:
            self.session_stats = dict(self.session.stats() or {})
        except Exception as e:  # stats() must not take the worker down
            self.session_stats = {"stats_error": str(e)}
        try:
            archive = _archive_of(self.session)
            self.archive_stats = dict(archive.stats()) if archive is not None else {}
        except Exception as e:  # the archive must not take the worker down either
            self.archive_stats = {"stats_error": f"{type(e).__name__}: {e}"}
        try:
            if self.node.memory_topics is not None:
                self.node.memory_topics.update(self.session)
        except Exception as e:  # the memory view must not take the worker down
            self.stats.last_error = f"memory: {type(e).__name__}: {e}"

    def main(self):
        next_frame_t = 0.0
        self.snapshot_stats()
        try:
            while True:
                with self.cv:
                    while True:
                        if self.stop_flag:
                            return
                        now = time.monotonic()
                        image_wait = self.image_wait(now)
                        if self.reset_events or self.save_events or image_wait == 0.0:
                            break
                        if self.frame is not None and now >= next_frame_t:
                            break
                        waits = [w for w in (image_wait, None if self.frame is None else next_frame_t - now)
                                 if w is not None]
                        self.cv.wait(min(max(min(waits), 0.001), 3600.0) if waits else None)
                    resets, self.reset_events = self.reset_events, []
                    saves, self.save_events = ([], self.save_events) if resets else (self.save_events, [])
                    instr = (self.instructions.popleft()[:2]
                             if self.image_wait(time.monotonic()) == 0.0 and not resets and not saves else None)
                    frame = None
                    if self.frame is not None and not saves and (instr is not None or
                                                                 time.monotonic() >= next_frame_t):
                        frame, self.frame = self.frame, None
                if resets:
                    self.do_reset(resets)
                    continue
                if saves:
                    self.snapshots.run(saves)
                    continue
                if frame is not None:
                    next_frame_t = time.monotonic() + 1.0 / float(self.p["frame_rate"])  # live parameter
                    self.observe(frame)
                if instr is not None:
                    self.answer(*instr)
                self.snapshot_stats()
        except BaseException as e:  # the session is lost: the watchdog sees a dead worker and zeroes the velocity
            self.session_lost = True
            self.stats.last_error = f"worker died: {type(e).__name__}: {e}"
            self.node.get_logger().fatal(f"worker thread died, session lost: {traceback.format_exc()}")
            self.node.motion.zero("worker died", disarm=True)

    def image_wait(self, now: float) -> float | None:
        """Seconds the first queued instruction still waits for the image received before it to settle
        (inputs.py), 0.0 when it can be answered now, None when no instruction is queued. The wait is bounded:
        a decode stops after max_decode_s."""
        if not self.instructions:
            return None
        _, t_received, image_seq = self.instructions[0]
        if image_seq <= self.node.inputs.settled_seq:
            return 0.0
        return max(t_received + float(self.p["max_decode_s"]) + 0.5 - now, 0.0)

    def session_error(self, where: str, e: Exception):
        self.stats.inc("errors")
        self.stats.last_error = f"{where}: {type(e).__name__}: {e}"
        self.node.get_logger().error(f"{where} failed: {type(e).__name__}: {e}")
        self.node.motion.zero(f"error in {where}")

    def observe(self, frame):
        rgb, stamp_s, stamp, _ = frame
        self.busy_since = time.monotonic()
        try:
            self.session.observe(np.ascontiguousarray(rgb), stamp_s)
        except ValueError as e:  # InvalidFrameError: the session is unchanged
            self.node.inputs.reject("frames", f"session refused the frame: {e}")
            return
        except Exception as e:
            self.session_error("observe", e)
            return
        finally:
            self.busy_since = 0.0
        self.stats.inc("frames_used")
        if self.node.memory_topics is not None:
            self.node.memory_topics.on_frame(rgb, stamp_s, stamp)
        self.frame_received = frame[3]
        self.node.outputs.remember_frame(stamp_s, stamp)

    def on_token(self, piece: str):
        if self.cancel.is_set():
            raise Cancelled()
        if self.p["answer_stream"] and piece:
            self.node.outputs.publish("answer_stream", String(data=piece))

    def ask(self, text: str, max_new_tokens: int, allowed_tokens_fn=None):
        g = self.p
        return self.session.ask(text, max_new_tokens=int(max_new_tokens), on_token=self.on_token,
                                temperature=float(g["generation.temperature"]), top_p=float(g["generation.top_p"]),
                                stop=list(g["generation.stop"]) or None, allowed_tokens_fn=allowed_tokens_fn)

    def is_command(self, text: str) -> tuple[bool, str]:
        mode, prefix = self.p["actions.mode"], self.p["actions.prefix"]
        if mode == "prefix" and prefix and text.lower().startswith(prefix.lower()):
            return True, text[len(prefix):].strip()
        return False, text

    def frame_age(self) -> float | None:
        t = self.frame_received
        return None if t is None else time.monotonic() - t

    def stale(self) -> bool:
        """The view is too old to act on (no frame at all counts as stale); max_frame_age 0 turns this off."""
        limit = float(self.p.get("max_frame_age", 0.0))
        age = self.frame_age()
        return limit > 0 and (age is None or age > limit)

    def decide_action(self, instruction: str) -> tuple[Action | None, str | None, object]:
        """Constrained decoding of one action, then validation. Returns (action, error, Answer or None)."""
        if self.stale():
            age = self.frame_age()
            err = ("view is stale: " + ("no frame yet" if age is None else f"newest frame {age:.1f} s old")
                   + f" > max_frame_age={self.p['max_frame_age']}; no action")
            self.validator.refuse(err)
            return None, err, None
        if self.constraint is None:
            err = f"constrained action decoding unavailable ({self.constraint_error}); no action"
            self.validator.refuse(err)
            return None, err, None
        prompt = self.p["actions.prompt"].format(instruction=instruction, schema=self.spec.describe())
        ans = self.ask(prompt, self.p["actions.max_new_tokens"], self.constraint.allowed_tokens_fn())
        action, err = self.validator.validate(ans.text)
        return action, err, ans

    def answer(self, text: str, t_received: float):
        self.busy_since = time.monotonic()
        self.cancel.clear()
        command, body = self.is_command(text)
        action = err = ans = None
        try:
            if command:
                action, err, ans = self.decide_action(body)
                answer_text = ans.text if ans is not None else ""
            else:
                ans = self.ask(text, self.p["generation.max_new_tokens"])
                answer_text = ans.text
                if self.p["actions.mode"] == "always":
                    action, err, _ = self.decide_action(text)
        except Cancelled:
            self.stats.inc("answers_cancelled")
            self.node.get_logger().info(f"generation for {text[:60]!r} cancelled")
            return
        except ValueError as e:  # InvalidInstructionError: the session is unchanged
            self.node.inputs.reject("instructions", f"session refused the instruction: {e}")
            return
        except Exception as e:
            self.session_error("ask", e)
            return
        finally:
            self.busy_since = 0.0
        latency = time.monotonic() - t_received
        if err is not None:
            self.stats.last_error = f"action: {err}"
            self.node.get_logger().error(f"action rejected (no motion): {err}")
        if action is not None:
            self.node.outputs.publish("action", String(data=action.to_json()))
            self.node.motion.command(action)
        age, stale = self.frame_age(), self.stale()
        if stale and not command:
            answer_text = ("[stale view: " + ("no frame yet" if age is None else f"newest frame {age:.1f} s old")
                           + "] " + answer_text)
        self.node.outputs.answer(text, answer_text, ans, action, err, latency, {
            "frame_age_s": None if age is None else round(age, 3), "stale": stale})
        with self.stats.lock:
            self.stats.c["answers"] += 1
            self.stats.answer_s.append(latency)

    def do_reset(self, events):
        try:
            self.session.reset()
            self.frame_received = None
            self.node.outputs.stamps.clear()
            self.stats.inc("resets")
            ok = True
        except Exception as e:
            self.session_error("reset", e)
            ok = False
        self.snapshot_stats()  # before answering the service: diagnostics then show the empty session
        for ev in events:
            ev.ok = ok
            ev.set()

"""A scripted stand-in for StreamingSession, injected into the node process with
``-p session_factory:=fake_session:make`` (PYTHONPATH includes test/ros).

It has the session's interface (observe/ask/reset/stats) and a character-level tokenizer, so the node builds a
real lm-format-enforcer constraint for it and the fake decodes actions *through* that constraint, token by
token, like a constrained model would. Environment knobs (set by the tests on the node process):

  FAKE_ASK_S       seconds each ask() keeps the CPU busy holding the GIL (pure Python loop), default 0.05
  FAKE_OBSERVE_S   same for observe(), default 0.0
Instruction hooks: "__raise__" -> RuntimeError (session error), "__invalid__" -> ValueError (refused input),
"__slow__" -> a 3 s answer in 30 pieces (to cancel), "__die__" -> SystemExit (kills the worker: session lost).
Action prompts: the first {...} in the prompt is what the fake "wants" to write; the constraint decides.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field


class CharTokenizer:
    """One token per printable ASCII character (+ \\n \\t \\r) and an EOS: enough for JSON actions."""

    def __init__(self):
        self.chars = [chr(i) for i in range(32, 127)] + ["\n", "\t", "\r"]
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.eos_token_id = len(self.chars)
        self.all_special_ids = [self.eos_token_id]

    def __len__(self):
        return len(self.chars) + 1

    def encode(self, s, add_special_tokens=False):
        return [self.index[c] for c in s if c in self.index]

    def decode(self, ids, **kw):
        return "".join(self.chars[i] for i in ids if 0 <= i < len(self.chars))


@dataclass
class FakeAnswer:
    text: str
    tokens: list = field(default_factory=list)
    frame_stamp: float | None = None
    latency_s: float = 0.0
    cache: dict = field(default_factory=dict)


def _busy(seconds: float):
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:  # holds the GIL like Python-heavy generation code does
        for i in range(200):
            x += i * i
    return x


class FakeSession:
    def __init__(self, params: dict):
        self.params = params
        self.tokenizer = CharTokenizer()
        self.budget = int(params.get("cache.budget", 512))
        self.ask_s = float(os.environ.get("FAKE_ASK_S", "0.05"))
        self.observe_s = float(os.environ.get("FAKE_OBSERVE_S", "0.0"))
        self.reset()

    def reset(self):
        self.seen = 0
        self.stored = 0
        self.frames = 0
        self.last_stamp = None
        self.evictions = 0

    def stats(self):
        return {"seen": self.seen, "stored": self.stored, "budget": self.budget, "kv_bytes": 4096 * self.budget,
                "evictions": self.evictions, "frames": self.frames, "policy": "fake"}

    def _add(self, n: int):
        self.seen += n
        self.stored += n
        if self.stored > self.budget:
            self.stored = self.budget
            self.evictions += 1

    def observe(self, frame, stamp):
        if getattr(frame, "ndim", 0) != 3 or frame.shape[2] != 3 or str(frame.dtype) != "uint8":
            raise ValueError(f"fake: frame must be HxWx3 uint8, got {getattr(frame, 'shape', None)}")
        if not frame.flags["C_CONTIGUOUS"]:
            raise ValueError("fake: frame must be C-contiguous (the node copies views before observe)")
        _busy(self.observe_s)
        self.frames += 1
        self.last_stamp = stamp
        self._add(16)

    def ask(self, text, max_new_tokens=32, on_token=None, temperature=0.0, top_p=1.0, stop=None,
            allowed_tokens_fn=None):
        t0 = time.perf_counter()
        if "__raise__" in text:
            raise RuntimeError("fake session failure")
        if "__invalid__" in text:
            raise ValueError("fake: instruction refused")
        if "__die__" in text:
            raise SystemExit("fake: the session died")
        self._add(len(text.split()))
        if allowed_tokens_fn is not None:
            m = re.search(r"\{.*?\}", text, re.S)
            out = self._constrained(m.group(0) if m else '{"action": "none"}', allowed_tokens_fn, max_new_tokens)
            pieces = [out]
        else:
            out = f"answer to: {text} (frames seen {self.frames})"
            pieces = [w + " " for w in out.split(" ")]
        ask_s = self.ask_s
        if "__slow__" in text:
            pieces, ask_s = [f"p{i} " for i in range(30)], 3.0
            out = "".join(pieces)
        n = len(pieces)
        for piece in pieces:
            _busy(ask_s / n)
            if on_token is not None:
                on_token(piece)
        self._add(len(out.split()))
        return FakeAnswer(text=out, tokens=list(range(len(pieces))), frame_stamp=self.last_stamp,
                          latency_s=time.perf_counter() - t0, cache=self.stats())

    def _constrained(self, intended: str, fn, max_new_tokens: int) -> str:
        tok, ids = self.tokenizer, []
        for ch in intended:
            if len(ids) >= max_new_tokens:
                break
            allowed = fn(ids)
            t = tok.index.get(ch)
            if t in allowed:
                ids.append(t)
            elif allowed and allowed[0] != tok.eos_token_id:
                ids.append(allowed[0])  # forced, as a constrained decoder would be
            else:
                break
        while len(ids) < max_new_tokens:
            allowed = fn(ids)
            if tok.eos_token_id in allowed or not allowed:
                break
            ids.append(allowed[0])
        return tok.decode(ids)


def make(params: dict) -> FakeSession:
    return FakeSession(params)

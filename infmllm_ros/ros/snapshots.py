"""``~/save`` and ``memory.restore``: the node's side of engine/snapshot.py.

The session belongs to the worker thread, so a save is queued to it (``request`` from the service callback, ``run``
on the worker between two steps: never during a forward; an answer being generated finishes first). ``restore``
runs at configure, before the worker starts. Neither may stop the node: a bad path, a full disk, a snapshot of
another model or a damaged file is logged, counted and reported, and the session goes on (or starts fresh)."""

from __future__ import annotations

import os
import threading


class Snapshots:
    def __init__(self, worker):
        self.worker = worker
        self.status = "off"  # what configure did with memory.snapshot / memory.restore (diagnostics)
        self.last_save = ""  # the last ~/save's outcome (diagnostics)

    @property
    def path(self) -> str:
        return str(self.worker.p.get("memory.snapshot", "") or "")

    def restore(self):
        """memory.restore: resume from memory.snapshot when it exists; any failure is logged and the session starts
        fresh (a snapshot of another model or config, a damaged file: the node must still come up)."""
        w, path = self.worker, self.path
        log = w.node.get_logger()
        self.status, self.last_save = ("fresh start" if path else "off"), ""
        if not path or not w.p.get("memory.restore", False):
            return
        restore = getattr(w.session, "restore", None)
        if not callable(restore):
            self.status = "fresh start: the session has no restore()"
            log.warning(f"memory.restore: {self.status}")
            return
        if not os.path.exists(path):
            self.status = f"fresh start: no snapshot at {path} yet"
            log.info(f"memory.restore: {self.status}")
            return
        try:
            header = restore(path)
        except Exception as e:  # SnapshotError says why; anything else is a bug, still no crash
            self.status = f"fresh start: restore failed: {e}"
            w.stats.last_error = f"restore: {e}"
            log.error(f"memory.restore: could not resume from {path}: {type(e).__name__}: {e}; starting fresh")
            return
        h = header if isinstance(header, dict) else {}
        self.status = (f"resumed from {path} ({h.get('frames_seen', '?')} frames seen, "
                       f"{h.get('tokens_stored', '?')} tokens stored)")
        log.info(f"memory.restore: {self.status}")

    def request(self, timeout: float) -> tuple[bool, str]:
        """~/save (service thread): queue a save for the worker and wait up to `timeout` s for its outcome."""
        w = self.worker
        if w.session is None or w.thread is None:
            return False, "not configured"
        if not self.path:
            return False, "memory.snapshot is empty (saving is off): set it to a file path, then reconfigure"
        if not callable(getattr(w.session, "save", None)):
            return False, "the session (session_factory) has no save()"
        ev = threading.Event()
        ev.ok, ev.message = False, ""
        with w.cv:
            w.save_events.append(ev)
            w.cv.notify_all()
        if ev.wait(timeout):
            return bool(ev.ok), ev.message
        return False, f"save pending: the worker is busy (after {timeout:g} s); it saves after the current step"

    def run(self, events):
        """On the worker thread: write the snapshot, answer every waiting request."""
        w, path = self.worker, self.path
        try:
            info = w.session.save(path)
            info = info if isinstance(info, dict) else {}
            ok, msg = True, (f"saved {info.get('path', path)} ({info.get('bytes', '?')} bytes, "
                             f"{info.get('frames_seen', '?')} frames seen, {info.get('tokens_stored', '?')} tokens "
                             "stored)")
            w.stats.inc("snapshots_saved")
            w.node.get_logger().info(msg)
        except Exception as e:  # a bad path, a full disk: the session is untouched, the node keeps running
            ok, msg = False, f"save to {path} failed: {e}"
            w.stats.inc("snapshot_errors")
            w.stats.last_error = f"save: {e}"
            w.node.get_logger().error(msg)
        self.last_save = msg
        for ev in events:
            ev.ok, ev.message = ok, msg
            ev.set()

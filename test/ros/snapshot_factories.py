"""Session factories for the snapshot node tests (PYTHONPATH includes test/ros):

``snapshot_factories:faulty_archive``  the real engine (``model`` parameter, e.g. tiny:llava_llama) with a
    stand-in long-term memory (``session.recall``, as memory/recall.py's FrameRecall) whose archive reports a disk
    fault, as the frame archive does after a failed page write (FrameArchive.stats() keys);
``snapshot_factories:saving_fake``  the scripted fake session with a save() that records which thread called
    it and whether an answer was being generated at that moment."""

import json
import threading

from fake_session import FakeSession

from infmllm_ros.ros.session_factory import make_session


class FaultyArchive:
    path = ""

    def stats(self) -> dict:
        return dict(frames=3, used_bytes=3000, max_bytes=4096, write_errors=1, damaged=2, skipped=5, dropped=0,
                    stopped="write failed: [Errno 28] No space left on device")

    def state(self) -> dict:
        return {"version": 1, "config": {}, "counters": {}, "stopped": None, "frames": []}


class FaultyRecall:
    """FrameRecall's interface to the session: archives nothing, recalls nothing."""

    def __init__(self):
        self.archive = FaultyArchive()

    def reset(self):
        pass

    def archive_frame(self, cache, n, stamp):
        return False

    def before_question(self, session, chunk, question_tokens):
        return 0

    def release(self, cache):
        pass

    def stats(self):
        return {"archive": self.archive.stats(), "recalls": 0}


def faulty_archive(params: dict):
    session = make_session(params)
    session.recall = FaultyRecall()
    return session


class SavingFake(FakeSession):
    asking = False

    def ask(self, *args, **kwargs):
        self.asking = True
        try:
            return super().ask(*args, **kwargs)
        finally:
            self.asking = False

    def save(self, path):
        record = {"during_ask": self.asking, "thread": threading.current_thread().name, "seen": self.seen}
        with open(path, "w") as f:
            json.dump(record, f)
        return {"path": path, "bytes": len(json.dumps(record)), "frames_seen": self.frames,
                "tokens_stored": self.stored}


def saving_fake(params: dict):
    return SavingFake(params)

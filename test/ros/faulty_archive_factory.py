"""Session factory for node tests (``-p session_factory:=faulty_archive_factory:make``): the real engine
(``model`` parameter, e.g. tiny:llava_llama) with a stand-in ``session.archive`` that reports a disk fault, as
the frame archive does after a failed page write (FrameArchive.stats() keys)."""

from infmllm_ros.ros.session_factory import make_session


class FaultyArchive:
    path = ""

    def stats(self) -> dict:
        return dict(frames=3, used_bytes=3000, max_bytes=4096, write_errors=1, damaged=2, skipped=5, dropped=0,
                    stopped="write failed: [Errno 28] No space left on device")

    def state(self) -> dict:
        return {"version": 1, "config": {}, "counters": {}, "stopped": None, "frames": []}


def make(params: dict):
    session = make_session(params)
    session.archive = FaultyArchive()
    return session

"""~/save and memory.restore over real DDS with the REAL engine (tiny offline VLM in the node process): a node
saves, answers one more question and stops; a NEW node process restores the snapshot at configure and shows the
same memory (frames seen, tokens seen / stored) and gives the same answer to that question (the oracle: the node
that went on). A bad snapshot path is a clear error and the node keeps running; a faulty frame archive turns
/diagnostics WARN while answers go on. ~/save waits for a running answer: the worker thread saves between steps."""

from __future__ import annotations

import json
import os
import time

import pytest
from _harness import Client, NodeProcess, diag_values, domain, make_image

pytestmark = [pytest.mark.ros, pytest.mark.slow]

DOMAIN = domain(2)
NS = "/infmllm_node"
PARAMS = {
    "model": "tiny:llava_llama", "device": "cpu", "dtype": "float32", "frame_rate": 4.0, "max_frame_age": 0.0,
    "cache.budget": 64, "cache.recent": 16, "cache.window": 8, "cache.max_chunk": 128,
    "generation.max_new_tokens": 8, "memory.restore": True,
    "instruction_durability": "transient_local", "output_durability": "transient_local",
    "image_reliability": "reliable",
}


class Run:
    """One node process and a client that collects its outputs."""

    def __init__(self, params: dict):
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        self.node = NodeProcess(DOMAIN, params=params)
        self.c = c = Client(DOMAIN)
        tl = c.qos(transient=True)
        c.collect(String, f"{NS}/result", tl, "result")
        c.collect(String, f"{NS}/memory", c.qos(depth=1, transient=True), "memory")
        c.collect(DiagnosticArray, "/diagnostics", c.qos(), "diag")
        self.image_pub = c.node.create_publisher(Image, "/image", c.qos(depth=5))
        self.instr_pub = c.node.create_publisher(String, "/instruction", c.qos(depth=10, transient=True))
        ok = c.wait_for(lambda: not self.node.alive() or (
            c.got("diag") and diag_values(c.got("diag")[-1]).get("state") == "active"), 120)
        assert ok and self.node.alive(), f"node did not become active:\n{self.node.log()}"
        assert c.wait_for(lambda: self.image_pub.get_subscription_count() > 0, 10)

    def diag(self) -> dict:
        t = time.monotonic()
        assert self.c.wait_for(lambda: [m for tt, m in self.c.msgs["diag"] if tt > t], 10)
        return diag_values(self.c.got("diag")[-1])

    def ask(self, text: str) -> dict:
        from std_msgs.msg import String

        self.instr_pub.publish(String(data=text))
        r = self.c.wait_for(lambda: [x for x in self.results() if x["instruction"] == text], 60)
        assert r, self.node.log()[-3000:]
        return r[-1]

    def results(self):
        return [json.loads(m.data) for m in self.c.got("result")]

    def save(self):
        from std_srvs.srv import Trigger

        return self.c.call(Trigger, f"{NS}/save", Trigger.Request(), timeout=60)

    def close(self):
        self.c.close()
        rc = self.node.stop(timeout=20)
        assert rc in (0, -2), f"node exit code {rc}\n{self.node.log()[-3000:]}"


MEMORY_KEYS = ("session_frames_seen", "session_questions", "tokens_seen", "tokens_stored", "evictions",
               "session_next_position")


def test_save_then_a_new_node_resumes_and_answers_like_the_one_that_went_on(tmp_path):
    pytest.importorskip("transformers")
    path = tmp_path / "session.snap"
    params = dict(PARAMS, **{"memory.snapshot": str(path)})
    a = Run(params)
    try:
        assert a.diag()["snapshot_status"].startswith("fresh start: no snapshot"), a.node.log()[-2000:]
        for k in range(6):
            a.image_pub.publish(make_image(48, 64, seed=k, stamp=(500 + k, 0)))
            time.sleep(0.3)
        a.ask("Describe the image.")
        resp = a.save()
        assert resp.success, resp.message
        assert str(path) in resp.message and f"({os.path.getsize(path)} bytes" in resp.message
        saved = a.diag()
        assert saved["snapshots_saved"] == 1 and saved["session_frames_seen"] >= 2 and saved["evictions"] >= 1
        went_on = a.ask("What is in front of the robot?")  # the oracle: the node that never stopped
    finally:
        a.close()

    b = Run(params)
    try:
        d = b.diag()
        assert d["snapshot_status"].startswith(f"resumed from {path}"), b.node.log()[-2000:]
        assert "resumed from" in b.node.log()
        assert {k: d[k] for k in MEMORY_KEYS} == {k: saved[k] for k in MEMORY_KEYS}
        assert d["_level"] == 0, d["_message"]
        mem = b.c.wait_for(lambda: b.c.got("memory"), 10)
        assert mem and json.loads(mem[-1].data)["totals"]["frames_seen"] == saved["session_frames_seen"]
        resumed = b.ask("What is in front of the robot?")
        assert (resumed["answer"], resumed["tokens"], resumed["cache"]) == (
            went_on["answer"], went_on["tokens"], went_on["cache"])
    finally:
        b.close()


def test_bad_snapshot_path_and_faulty_archive_keep_the_node_running(tmp_path):
    pytest.importorskip("transformers")
    bad = tmp_path / "a_directory"
    bad.mkdir()
    r = Run(dict(PARAMS, **{"memory.snapshot": str(bad), "session_factory": "snapshot_factories:faulty_archive"}))
    try:
        d = r.diag()
        assert d["snapshot_status"].startswith("fresh start: restore failed"), d["snapshot_status"]
        assert "Is a directory" in d["snapshot_status"] and d["tokens_seen"] == 0
        resp = r.save()
        assert not resp.success and "Is a directory" in resp.message and str(bad) in resp.message
        assert r.node.alive()
        r.image_pub.publish(make_image(48, 64, seed=1, stamp=(600, 0)))
        time.sleep(0.5)
        assert isinstance(r.ask("Describe the image.")["answer"], str)  # answering continues
        d = r.diag()
        assert d["_level"] == 1 and d["_message"].startswith("frame archive: stopped (write failed"), d["_message"]
        assert "1 write error(s)" in d["_message"] and "2 damaged page(s)" in d["_message"]
        assert d["archive_write_errors"] == 1 and d["snapshot_errors"] == 1 and d["session_lost"] is False
    finally:
        r.close()


def test_save_runs_on_the_worker_between_steps_not_during_an_answer(tmp_path):
    from std_msgs.msg import String

    path = tmp_path / "fake.snap"
    r = Run({"session_factory": "snapshot_factories:saving_fake", "memory.snapshot": str(path),
             "instruction_durability": "transient_local", "output_durability": "transient_local"})
    try:
        r.instr_pub.publish(String(data="__slow__"))  # a 3 s answer
        assert r.c.wait_for(lambda: r.diag()["worker_busy_s"] > 0, 10)
        resp = r.save()
        assert resp.success, resp.message
        record = json.loads(path.read_text())
        # saved by the worker after the answer: the fake counts 1 instruction word + 30 answer pieces
        assert record == {"during_ask": False, "thread": "infmllm_session", "seen": 31}
        assert r.c.wait_for(lambda: [x for x in r.results() if x["instruction"] == "__slow__"], 10)
    finally:
        r.close()

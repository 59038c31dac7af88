"""save() / restore(): a session saved mid-stream and restored into a NEW session object answers the rest of the
stream with exactly the logits of a session that never stopped (the oracle), for a 1-D RoPE family and an M-RoPE
one; a snapshot of another model / config / dtype, or a damaged one, is a clear error and a fresh start."""

import os

import pytest
import torch
from engine_helpers import frame, make_session

from infmllm_ros.cache import CacheConfig
from infmllm_ros.engine import SnapshotCorruptError, SnapshotError, SnapshotMismatchError
from infmllm_ros.engine import snapshot as snap
from infmllm_ros.engine.tiny import tiny_model

FAMILIES = ("llava_llama", "qwen2_vl")  # 1-D RoPE, Qwen2-VL M-RoPE (3 position rows)
CFG = CacheConfig(policy="saddle", budget=64, recent=16, window=8, max_chunk=128, max_new_tokens=6)


def _head(s):
    """The stream before the save: enough frames to evict and re-index, then a sampled answer (its last token and
    the closing text stay pending), then one more frame."""
    for i in range(6):
        s.observe(frame(10 + i), 0.5 * i)
    s.ask("What is in front of the robot?", max_new_tokens=4, temperature=0.9, seed=3)
    s.observe(frame(30), 3.5)
    s.ask("Describe the image.", max_new_tokens=3, temperature=0.8)  # generator state continues from here


def _tail(s):
    """The stream after the save: sampled answers (the generator must continue), frames, evictions."""
    out = [s.ask("Move forward and turn left.", max_new_tokens=5, temperature=0.8, top_p=0.9, output_logits=True)]
    for i in range(3):
        s.observe(frame(40 + i), 4.0 + 0.5 * i)
    out.append(s.ask("What changed since t=1.5s? Answer in one word.", max_new_tokens=5, output_logits=True))
    return out


def _same_answers(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.tokens == y.tokens
        torch.testing.assert_close(x.logits, y.logits, atol=0, rtol=0)
        assert x.cache == y.cache
        assert x.evidence == y.evidence


@pytest.mark.parametrize("family", FAMILIES)
def test_restored_session_answers_like_one_that_never_stopped(tiny, family, tmp_path):
    model, proc = tiny(family)
    ref = make_session(model, proc, CFG)
    _head(ref)
    ref_stats, ref_memory = ref.stats(), ref.memory()
    expected = _tail(ref)

    saver = make_session(model, proc, CFG)
    _head(saver)
    assert saver.stats()["cache"]["evictions"] > 0 and saver._pending  # evicted, and tokens wait for the next chunk
    info = saver.save(tmp_path / "s.snap")
    assert info["bytes"] == os.path.getsize(tmp_path / "s.snap") > 0
    del saver

    fresh = make_session(model, proc, CFG)
    header = fresh.restore(tmp_path / "s.snap")
    assert header["frames_seen"] == ref_stats["frames_seen"] == 7
    st = fresh.stats()
    for k in ("frames_seen", "questions", "tokens_seen", "tokens_stored", "next_position", "last_stamp"):
        assert st[k] == ref_stats[k], k
    assert fresh.memory() == ref_memory
    _same_answers(_tail(fresh), expected)


def test_save_right_after_reset_keeps_the_system_turn_pending(tiny, tmp_path):
    model, proc = tiny("llava_llama")
    ref = make_session(model, proc, CFG)
    expected = _tail(ref)
    s = make_session(model, proc, CFG)
    info = s.save(tmp_path / "empty.snap")
    assert info["bytes"] < s.kv_bytes / 4  # only the stored slots are written, not the whole buffers
    fresh = make_session(model, proc, CFG, system_prompt="Another prompt.")  # pending comes from the snapshot
    fresh.restore(tmp_path / "empty.snap")
    _same_answers(_tail(fresh), expected)


def _fresh_oracle(model, proc, cfg=CFG):
    return _tail(make_session(model, proc, cfg))


def _assert_fresh(s, expected):
    st = s.stats()
    assert (st["tokens_seen"], st["tokens_stored"], st["next_position"], st["frames_seen"]) == (0, 0, 0, 0)
    _same_answers(_tail(s), expected)


def _saved(tiny, tmp_path, family="llava_llama"):
    model, proc = tiny(family)
    s = make_session(model, proc, CFG)
    _head(s)
    path = tmp_path / "s.snap"
    s.save(path)
    return model, proc, path


def test_other_cache_config_is_refused_and_starts_fresh(tiny, tmp_path):
    model, proc, path = _saved(tiny, tmp_path)
    other = CacheConfig(policy="saddle", budget=80, recent=16, window=8, max_chunk=128, max_new_tokens=6)
    s = make_session(model, proc, other)
    s.observe(frame(1), 0.0)  # state before the restore attempt is dropped too
    with pytest.raises(SnapshotMismatchError, match="cache config.*budget"):
        s.restore(path)
    _assert_fresh(s, _fresh_oracle(model, proc, other))


def test_other_model_weights_are_refused(tiny, tmp_path):
    model, proc, path = _saved(tiny, tmp_path)
    other, other_proc = tiny_model("llava_llama", seed=1)  # same architecture and config, other weights
    s = make_session(other, other_proc, CFG)
    with pytest.raises(SnapshotMismatchError, match="model"):
        s.restore(path)
    _assert_fresh(s, _fresh_oracle(other, other_proc))


def test_other_family_is_refused(tiny, tmp_path):
    _, _, path = _saved(tiny, tmp_path)
    model, proc = tiny("qwen2_vl")
    s = make_session(model, proc, CFG)
    with pytest.raises(SnapshotMismatchError, match="saved with model"):
        s.restore(path)
    _assert_fresh(s, _fresh_oracle(model, proc))


def test_other_dtype_is_refused(tiny, tmp_path):
    _, _, path = _saved(tiny, tmp_path)
    model, proc = tiny_model("llava_llama", seed=0)  # its own copy: the session converts the model in place
    s = make_session(model, proc, CFG, dtype=torch.bfloat16)
    with pytest.raises(SnapshotMismatchError, match="dtype"):
        s.restore(path)
    assert s.stats()["tokens_seen"] == 0
    s.observe(frame(1), 0.0)  # usable
    assert s.ask("Describe the image.", max_new_tokens=2).tokens


def _damage(path, how):
    data = path.read_bytes()
    if how == "flip":
        i = len(data) - 100
        data = data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:]
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "header":
        data = data[:20]
    elif how == "empty":
        data = b""
    elif how == "garbage":
        data = b"not a snapshot at all" * 50
    path.write_bytes(data)


@pytest.mark.parametrize("how", ["flip", "truncate", "header", "empty", "garbage", "missing"])
def test_damaged_snapshot_is_a_clear_error_and_a_fresh_start(tiny, tmp_path, how):
    model, proc, path = _saved(tiny, tmp_path)
    if how == "missing":
        path.unlink()
    else:
        _damage(path, how)
    s = make_session(model, proc, CFG)
    s.observe(frame(1), 0.0)
    with pytest.raises(SnapshotCorruptError, match=str(path)):
        s.restore(path)
    _assert_fresh(s, _fresh_oracle(model, proc))


def test_payload_not_fitting_the_cache_is_refused(tiny, tmp_path, monkeypatch):
    """A checksummed payload whose tensors do not match the header's layout (a writer bug) is still refused."""
    model, proc = tiny("llava_llama")
    s = make_session(model, proc, CFG)
    _head(s)
    real = snap._payload

    def bad_payload(session):
        p = real(session)
        p["cache"]["tensors"]["keys"] = p["cache"]["tensors"]["keys"][:, :1]
        return p

    monkeypatch.setattr(snap, "_payload", bad_payload)
    s.save(tmp_path / "bad.snap")
    fresh = make_session(model, proc, CFG)
    with pytest.raises(SnapshotCorruptError, match="keys"):
        fresh.restore(tmp_path / "bad.snap")
    _assert_fresh(fresh, _fresh_oracle(model, proc))


def test_failed_save_leaves_the_previous_snapshot(tiny, tmp_path, monkeypatch):
    model, proc = tiny("llava_llama")
    s = make_session(model, proc, CFG)
    s.observe(frame(1), 0.0)
    path = tmp_path / "s.snap"
    s.save(path)
    before = path.read_bytes()
    s.observe(frame(2), 0.5)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snap.os, "fsync", full_disk)
    with pytest.raises(SnapshotError, match="No space left"):
        s.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [n for n in os.listdir(tmp_path) if n != "s.snap"] == []  # no temporary file left behind
    with pytest.raises(SnapshotError, match="does not exist"):
        s.save(tmp_path / "no_such_dir" / "s.snap")
    fresh = make_session(model, proc, CFG)
    assert fresh.restore(path)["frames_seen"] == 1


def _archive(path, max_bytes=1 << 20):
    from infmllm_ros.memory import FrameArchive

    return FrameArchive(str(path), max_bytes, layers=2, heads=2, head_dim=16)  # clears the folder, as a new stream


class FakeRecall:
    """Stands in for memory/recall.py's FrameRecall where the test needs only its archive and bookkeeping."""

    def __init__(self, path, max_bytes=1 << 20):
        self.path, self.max_bytes = path, max_bytes
        self.reset()

    def reset(self):  # as FrameRecall: a new stream gets a new archive, its folder cleared
        self.archive, self.ranges, self.recalls, self.last = _archive(self.path, self.max_bytes), {}, 0, {}

    def stats(self):
        return {"archive": self.archive.stats(), "recalls": self.recalls}


def _add(recall, frame_id, seed):
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(2, 2, 5, 16, generator=g) for _ in range(2))
    assert recall.archive.add(frame_id, 0.5 * frame_id, k, v, torch.arange(5)[:, None] + 5 * frame_id)
    recall.ranges[frame_id] = (frame_id, frame_id + 5)


def test_archive_index_and_pages_travel_with_the_snapshot(tiny, tmp_path):
    """The frame archive's index and bookkeeping are saved with its pages (hard links beside the snapshot), so a
    new session, whose archive folder was cleared when it started, gets the archived frames back byte for byte."""
    model, proc = tiny("llava_llama")
    s = make_session(model, proc, CFG)
    s.observe(frame(1), 0.0)
    arch_dir = tmp_path / "archive"
    s.recall = FakeRecall(arch_dir)
    _add(s.recall, 7, 0)
    _add(s.recall, 9, 1)
    s.recall.recalls, s.recall.last = 3, {"frames": 1}
    archived = {f: s.recall.archive.get(f) for f in (7, 9)}
    s.save(tmp_path / "s.snap")
    _add(s.recall, 11, 2)  # written after the snapshot: not in it
    s.recall.reset()  # a reset / a restart clears the folder

    fresh = make_session(model, proc, CFG)
    fresh.recall = FakeRecall(arch_dir)
    fresh.restore(tmp_path / "s.snap")
    r = fresh.recall
    assert list(r.archive.frames) == [7, 9] and sorted(os.listdir(arch_dir)) == sorted(
        r.archive.frames[f].file for f in (7, 9))
    for f in (7, 9):
        for a, b in zip(r.archive.get(f), archived[f], strict=True):
            assert torch.equal(a, b)
    assert r.archive.stats()["damaged"] == 0
    assert r.ranges == {7: (7, 12), 9: (9, 14)} and r.recalls == 3 and r.last == {"frames": 1}

    s.save(tmp_path / "s.snap")  # a second save replaces the pages folder of the first
    assert len([n for n in os.listdir(tmp_path) if ".pages-" in n]) == 1

    other = make_session(model, proc, CFG)
    other.recall = FakeRecall(tmp_path / "a2", 2 << 20)
    with pytest.raises(SnapshotMismatchError, match="archive"):
        other.restore(tmp_path / "s.snap")


def test_lost_archive_page_counts_as_damaged_and_is_never_recalled(tiny, tmp_path):
    model, proc = tiny("llava_llama")
    s = make_session(model, proc, CFG)
    arch_dir = tmp_path / "archive"
    s.recall = FakeRecall(arch_dir)
    for f in (7, 9):
        _add(s.recall, f, f)
    s.save(tmp_path / "s.snap")
    pages = next(n for n in os.listdir(tmp_path) if ".pages-" in n)
    os.remove(tmp_path / pages / s.recall.archive.frames[9].file)

    fresh = make_session(model, proc, CFG)
    fresh.recall = FakeRecall(arch_dir)
    fresh.restore(tmp_path / "s.snap")
    r = fresh.recall
    assert list(r.archive.frames) == [7] and r.archive.stats()["damaged"] == 1
    assert r.ranges == {7: (7, 12)}


def _recall_supported() -> bool:
    import inspect

    from infmllm_ros.engine import StreamingSession

    return "recall_frames" in inspect.signature(StreamingSession.__init__).parameters


@pytest.mark.skipif(not _recall_supported(), reason="the session has no long-term memory (memory/recall.py) yet")
@pytest.mark.parametrize("family", FAMILIES)
def test_restored_session_with_recall_answers_like_one_that_never_stopped(tiny, family, tmp_path):
    """Long-term memory on: frames archived at prefill and recalled per question; the restored session (its archive
    folder cleared when it was built) recalls the same frames and answers with the same logits."""
    model, proc = tiny(family)
    kw = dict(recall_frames=1, archive_mb=4.0)
    ref = make_session(model, proc, CFG, archive_dir=str(tmp_path / "ref"), **kw)
    _head(ref)
    expected = _tail(ref)
    saver = make_session(model, proc, CFG, archive_dir=str(tmp_path / "live"), **kw)
    _head(saver)
    assert saver.archive.stats()["frames"] >= 6 and saver.recall.recalls >= 1 and saver.recall.captions
    saver_captions = dict(saver.recall.captions)
    saver.save(tmp_path / "s.snap")
    del saver
    fresh = make_session(model, proc, CFG, archive_dir=str(tmp_path / "live"), **kw)
    assert fresh.archive.stats()["frames"] == 0
    fresh.restore(tmp_path / "s.snap")
    assert fresh.archive.stats()["damaged"] == 0
    assert fresh.recall.captions == saver_captions  # made over the cache before the save: not made again
    _same_answers(_tail(fresh), expected)
    assert fresh.recall.recalls == ref.recall.recalls
    assert fresh.recall.captions == ref.recall.captions


def test_save_killed_after_linking_pages_keeps_the_previous_snapshot_and_its_pages(tiny, tmp_path, monkeypatch):
    """A save that dies between linking the new pages folder and renaming the snapshot (as a SIGKILL would: no
    cleanup runs) leaves the previous snapshot naming its own complete folder; the next save removes the orphan."""
    model, proc = tiny("llava_llama")
    s = make_session(model, proc, CFG)
    s.observe(frame(1), 0.0)
    s.recall = FakeRecall(tmp_path / "archive")
    _add(s.recall, 7, 0)
    path = tmp_path / "s.snap"
    s.save(path)
    first = {f: s.recall.archive.get(f) for f in (7,)}
    _add(s.recall, 9, 1)
    s.recall.archive._drop(7)  # thinned after the first save: its page name leaves the archive folder

    class Killed(BaseException):
        pass

    def die(*a):
        raise Killed()

    monkeypatch.setattr(snap.os, "replace", die)
    with pytest.raises(Killed):
        s.save(path)
    monkeypatch.undo()
    assert len([n for n in os.listdir(tmp_path) if ".pages-" in n]) == 2  # the previous folder and the orphan

    fresh = make_session(model, proc, CFG)
    fresh.recall = FakeRecall(tmp_path / "archive")
    assert fresh.restore(path)["frames_seen"] == 1
    assert list(fresh.recall.archive.frames) == [7]
    for a, b in zip(fresh.recall.archive.get(7), first[7], strict=True):
        assert torch.equal(a, b)
    fresh.save(path)
    assert len([n for n in os.listdir(tmp_path) if ".pages-" in n]) == 1

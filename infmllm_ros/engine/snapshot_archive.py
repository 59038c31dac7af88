"""The frame archive's part of a snapshot (engine/snapshot.py): its index (`archive.state()`), the recall
bookkeeping beside it, and its pages.

Why the pages travel too: the archive directory is cleared when a session is built and on reset (a new stream owns
it), so after a restart the pages the saved index names are gone before restore runs. Pages are immutable once
written (one file per frame, written to a temporary name and renamed), so the snapshot keeps them as HARD LINKS in
a folder beside the snapshot file (`<snapshot>.pages-<id>`; a copy where links are impossible): no bytes copied,
and the archive may drop or clear its own names without touching them. Each save links a new folder before the
snapshot file is renamed into place and removes the older folders after, so the file on disk always names a
complete folder; a folder a killed save left behind is removed by the next save.

Where the archive lives: `session.recall.archive` (memory/recall.py, with its `ranges` / `recalls` / `last`
bookkeeping), else a plain `session.archive` attribute; no archive, nothing saved.
"""

from __future__ import annotations

import os
import shutil
import uuid

from infmllm_ros.engine.errors import SnapshotMismatchError

PAGES_INFIX = ".pages-"
RECALL_FIELDS = ("ranges", "recalls", "last")  # FrameRecall's per-stream bookkeeping (plain data)
# FrameRecall.captions {frame_id: frozenset of words}, saved as sorted lists (torch.load weights_only takes no sets).
# Why they travel: a caption is made over the cache as it was when its frame was first ranked; made again after a
# restore, over another cache, it may name other words and recall another frame than the session that never stopped.


def archive_of(session):
    recall = getattr(session, "recall", None)
    if recall is not None and hasattr(recall, "archive"):
        return recall.archive
    return getattr(session, "archive", None)


def state(session) -> dict | None:
    archive = archive_of(session)
    if archive is None:
        return None
    recall = getattr(session, "recall", None)
    extra = {k: getattr(recall, k) for k in RECALL_FIELDS if recall is not None and hasattr(recall, k)}
    if recall is not None and hasattr(recall, "captions"):
        extra["captions"] = {int(f): sorted(words) for f, words in recall.captions.items()}
    return {"archive": archive.state(), "recall": extra}


def link_pages(session, snapshot_path: str, memory: dict | None) -> str | None:
    """Hard-link (or copy) the pages the index names into a new folder beside the snapshot; its name, or None."""
    if memory is None:
        return None
    src_dir = archive_of(session).path
    name = os.path.basename(snapshot_path) + PAGES_INFIX + uuid.uuid4().hex[:12]
    dst_dir = os.path.join(os.path.dirname(snapshot_path), name)
    os.mkdir(dst_dir)
    try:
        for f in memory["archive"]["frames"]:
            _link(os.path.join(src_dir, f["file"]), os.path.join(dst_dir, f["file"]))
        _fsync_dir(dst_dir)
    except BaseException:
        shutil.rmtree(dst_dir, ignore_errors=True)
        raise
    return name


def remove_pages(snapshot_path: str, keep: str | None) -> None:
    """Remove every pages folder of this snapshot path except `keep` (older saves', killed saves')."""
    directory, prefix = os.path.dirname(snapshot_path), os.path.basename(snapshot_path) + PAGES_INFIX
    for name in os.listdir(directory):
        if name.startswith(prefix) and name != keep:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def check(session, memory: dict | None, path: str) -> None:
    archive = archive_of(session)
    if archive is None or memory is None:
        return
    theirs, ours = memory["archive"].get("config"), archive.state().get("config")
    if theirs != ours:
        raise SnapshotMismatchError(f"{path}: the snapshot's frame archive was configured {theirs}, this session's "
                                    f"is {ours}")


def apply(session, memory: dict | None, snapshot_path: str, pages: str | None) -> None:
    """After the session's reset: put the saved pages back into the archive folder and reopen the archive from the
    saved index (FrameArchive.open counts a page that is missing as damaged and drops names it does not know)."""
    archive = archive_of(session)
    if archive is None or memory is None:
        return  # archive off now (its saved index is ignored), or not saved (the fresh archive stays)
    st = memory["archive"]
    if pages:
        src_dir = os.path.join(os.path.dirname(os.path.abspath(snapshot_path)), pages)
        for f in st["frames"]:
            src, dst = os.path.join(src_dir, f["file"]), os.path.join(archive.path, f["file"])
            if os.path.exists(src):
                if os.path.lexists(dst):
                    os.remove(dst)
                _link(src, dst)
    reopened = type(archive).open(archive.path, st, fsync=getattr(archive, "fsync", False))
    recall = getattr(session, "recall", None)
    if recall is not None and hasattr(recall, "archive"):
        recall.archive = reopened
        for k, v in (memory.get("recall") or {}).items():
            if k in RECALL_FIELDS:
                setattr(recall, k, v)
        if hasattr(recall, "ranges"):  # frames the reopened archive lost (damaged pages) cannot be recalled
            recall.ranges = {f: r for f, r in recall.ranges.items() if f in reopened.frames}
        if hasattr(recall, "captions"):
            saved = (memory.get("recall") or {}).get("captions") or {}
            recall.captions = {int(f): frozenset(w) for f, w in saved.items() if int(f) in reopened.frames}
    else:
        session.archive = reopened


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except FileNotFoundError:
        return  # a page gone from disk: restore counts it as damaged
    except OSError:  # another filesystem, or links not supported: a durable copy
        shutil.copyfile(src, dst)
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

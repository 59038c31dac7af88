"""FrameArchive: a bounded on-disk store of past frames' K/V (int8), with a small in-RAM index for recall.

Storage: one file per frame page ("<frame_id>.kvp"), written to a temporary name and renamed into place.
Why not one preallocated memmap: frames differ in token count, so fixed slots would waste space or fragment;
with one file per page, dropping a frame frees exactly its bytes, a write that fails (ENOSPC, EFBIG) leaves
no half page behind, and a damaged page damages only itself. The byte bound counts every page file's full
size (header included); filesystem block rounding is not counted.

Page layout (little-endian): header = magic b"FKV1", frame_id i64, n i32, rows i32, layers i32, heads i32,
head_dim i32, payload length u64, crc32 u32 (zlib.crc32 of the payload). Payload = q_keys int8 [L,H,n,D],
key scales fp16 [L,H,1,D], q_values int8 [L,H,n,D], value scales fp16 [L,H,1,D], positions i64 [n, rows].

Keys are stored as the model rotated them at their original positions (the session re-rotates on recall).

Representative keys (the in-RAM index recall scores): by default the mean of the frame's dequantized keys per layer
and KV head ([L, H, 1, D]). With `rep_tokens` m > 0 and the model's `inv_freq`, the m keys of largest norm per
layer and head, turned back to position 0 (each token by its own position; M-RoPE: the frame as a whole by its
lowest position) ([L, H, m, D]); `score` then turns the queries back by their positions too, so the dot products
measure content, not where the frame and the question happen to sit. Why: in the recall bench a frame's mean
rotated key ranked the frame a past question asked about first in 0 of 35 questions, the 4 largest de-rotated
keys in 5 of 35 (50 candidates; held-out seeds 16-19).

Thinning rule when full: the oldest and the newest frame are always kept; among the others, drop the frame
whose two neighbours in time are closest together (the smallest gap stamp[i+1] - stamp[i-1]); i.e. remove
the frame whose loss leaves the most even spacing. A long stream thus degrades to evenly spaced samples
of the whole past instead of forgetting the far past.

Faults: an OSError while writing a page (disk full, file-size limit) stops archiving: add() returns False,
write_errors counts it, `stopped` holds the reason, and later adds return False (counted in `skipped`)
without touching the disk; what was archived stays readable. A page whose header or checksum does not
match on read is counted in `damaged`, removed from the index (so it is never recalled) and get() returns None.
"""

import base64
import math
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from infmllm_ros.memory.quant import dequantize, quantize


def turn(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE turn (rotate_half layout, fp32) of x [..., n, D] by delta [n] positions; dims past 2F pass through."""
    f = inv_freq.numel()
    ang = delta.to(torch.float32)[:, None] * inv_freq.to(torch.float32)
    cos, sin = ang.cos(), ang.sin()
    x = x.float()
    x1, x2 = x[..., :f], x[..., f:2 * f]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * f:]], -1)

MAGIC = b"FKV1"
HEADER = struct.Struct("<4sqiiiiiQI")
SUFFIX = ".kvp"
STATE_VERSION = 1


@dataclass
class FrameEntry:
    """In-RAM index of one archived frame."""

    frame_id: int
    stamp: float
    n: int
    pos_min: int
    pos_max: int
    file: str  # page file name inside the archive directory
    nbytes: int  # size of the page file on disk
    rep: torch.Tensor  # representative keys [layers, kv_heads, m, D] fp32 (see the module docstring)


def _write_all(path: str, data: bytes, fsync: bool) -> None:
    """Write data to a new file at path (module-level so tests can inject a disk fault)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


class FrameArchive:
    def __init__(self, path: str, max_bytes: int, layers: int, heads: int, head_dim: int, rows: int = 1,
                 fsync: bool = False, _clear: bool = True, rep_tokens: int = 0,
                 inv_freq: torch.Tensor | None = None):
        self.path, self.max_bytes = str(path), int(max_bytes)
        self.layers, self.heads, self.head_dim, self.rows = layers, heads, head_dim, rows
        self.fsync = fsync
        self.rep_tokens = int(rep_tokens)
        self.inv_freq = inv_freq.detach().float().cpu() if inv_freq is not None else None
        if self.rep_tokens and self.inv_freq is None:
            raise ValueError("rep_tokens > 0 needs the model's inv_freq (keys are turned back to position 0)")
        self.frames: dict[int, FrameEntry] = {}  # insertion order == stamp order (adds arrive in time order)
        self.used_bytes = 0
        self.write_errors = self.damaged = self.skipped = self.dropped = 0
        self.stopped: str | None = None
        os.makedirs(self.path, exist_ok=True)
        if _clear:  # a fresh archive owns its directory: stale pages would break the byte bound
            for name in os.listdir(self.path):
                if name.endswith(SUFFIX) or name.endswith(SUFFIX + ".tmp"):
                    os.remove(os.path.join(self.path, name))

    # ---- sizes -------------------------------------------------------------------------------------------
    def bytes_per_frame(self, n: int) -> int:
        """On-disk bytes of one page holding n tokens (header + int8 K/V + fp16 scales + positions)."""
        lhd = self.layers * self.heads * self.head_dim
        return HEADER.size + 2 * (lhd * n + lhd * 2) + n * self.rows * 8

    # ---- writing -----------------------------------------------------------------------------------------
    def add(self, frame_id: int, stamp: float, keys: torch.Tensor, values: torch.Tensor,
            positions: torch.Tensor) -> bool:
        """Archive one frame: keys/values [layers, kv_heads, n, D], positions [n, rows] long. False if not stored."""
        n = keys.shape[2]
        expect = (self.layers, self.heads, n, self.head_dim)
        if tuple(keys.shape) != expect or tuple(values.shape) != expect:
            raise ValueError(f"keys/values must be {expect}, got {tuple(keys.shape)} / {tuple(values.shape)}")
        positions = positions.reshape(n, self.rows) if positions.dim() == 1 else positions
        if tuple(positions.shape) != (n, self.rows):
            raise ValueError(f"positions must be [{n}, {self.rows}], got {tuple(positions.shape)}")
        if frame_id in self.frames:
            raise ValueError(f"frame {frame_id} already archived")
        if self.stopped is not None:
            self.skipped += 1
            return False
        size = self.bytes_per_frame(n)
        if size > self.max_bytes:
            self.skipped += 1
            return False
        while self.used_bytes + size > self.max_bytes:
            self._drop(self._thinning_victim(stamp))

        qk, sk = quantize(keys)
        qv, sv = quantize(values)
        payload = b"".join(t.contiguous().cpu().numpy().tobytes() for t in (qk, sk, qv, sv))
        payload += positions.to(torch.int64).contiguous().cpu().numpy().tobytes()
        header = HEADER.pack(MAGIC, frame_id, n, self.rows, self.layers, self.heads, self.head_dim,
                             len(payload), zlib.crc32(payload))
        name = f"{frame_id:012d}{SUFFIX}"
        final, tmp = os.path.join(self.path, name), os.path.join(self.path, name + ".tmp")
        try:
            _write_all(tmp, header + payload, self.fsync)
            os.replace(tmp, final)
        except OSError as err:
            self.write_errors += 1
            self.stopped = f"write failed: {err}"
            try:
                os.remove(tmp)
            except OSError:
                pass
            return False
        pos = positions.to(torch.int64).cpu()
        rep = self._representative(dequantize(qk, sk).cpu(), pos)
        self.frames[frame_id] = FrameEntry(frame_id, float(stamp), n, int(pos.min()), int(pos.max()), name,
                                           size, rep)
        self.used_bytes += size
        return True

    def _representative(self, keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if not self.rep_tokens:
            return keys.mean(dim=2, keepdim=True)
        delta = -(pos[:, 0] if self.rows == 1 else pos.min().expand(pos.shape[0]))
        k0 = turn(keys, delta, self.inv_freq)  # [L, H, n, D] at position 0
        m = min(self.rep_tokens, k0.shape[2])
        top = k0.norm(dim=-1).topk(m, dim=-1).indices  # [L, H, m]
        top = top[..., torch.arange(self.rep_tokens) % m]  # a frame shorter than rep_tokens repeats its keys
        return k0.gather(2, top[..., None].expand(-1, -1, -1, self.head_dim))

    def _thinning_victim(self, new_stamp: float) -> int:
        """The frame to drop (see module docstring); the new frame counts as the newest neighbour."""
        ids = list(self.frames)
        if len(ids) == 1:
            return ids[0]  # room for one frame only: the newest wins
        stamps = np.array([self.frames[i].stamp for i in ids] + [new_stamp])
        gaps = stamps[2:] - stamps[:-2]  # gap left by removing the frame at index 1 .. len(ids)-1
        return ids[1 + int(np.argmin(gaps))]

    def _drop(self, frame_id: int) -> None:
        entry = self.frames.pop(frame_id)
        self.used_bytes -= entry.nbytes
        self.dropped += 1
        try:
            os.remove(os.path.join(self.path, entry.file))
        except OSError:
            pass

    # ---- reading -----------------------------------------------------------------------------------------
    def get(self, frame_id: int, dtype: torch.dtype = torch.float32):
        """(keys, values, positions) dequantized, or None if unknown or damaged (damaged frames leave the index)."""
        entry = self.frames.get(frame_id)
        if entry is None:
            return None
        try:
            with open(os.path.join(self.path, entry.file), "rb") as f:
                data = f.read()
            magic, fid, n, rows, layers, heads, d, plen, crc = HEADER.unpack_from(data)
            payload = data[HEADER.size:]
            ok = (magic == MAGIC and (fid, n, rows, layers, heads, d) ==
                  (frame_id, entry.n, self.rows, self.layers, self.heads, self.head_dim)
                  and plen == len(payload) and zlib.crc32(payload) == crc)
        except (OSError, struct.error):
            ok = False
        if not ok:
            self.damaged += 1
            self._drop(frame_id)
            self.dropped -= 1  # a damaged page is counted in `damaged`, not as a thinning drop
            return None
        shape = (self.layers, self.heads, n, self.head_dim)
        sshape = (self.layers, self.heads, 1, self.head_dim)
        lhnd, lhd = math.prod(shape), math.prod(sshape)
        buf, off = np.frombuffer(payload, dtype=np.uint8), 0
        parts = []
        for count, np_dtype, shp in ((lhnd, np.int8, shape), (lhd, np.float16, sshape),
                                     (lhnd, np.int8, shape), (lhd, np.float16, sshape),
                                     (n * rows, np.int64, (n, rows))):
            nbytes = count * np.dtype(np_dtype).itemsize
            parts.append(torch.from_numpy(buf[off:off + nbytes].view(np_dtype).reshape(shp).copy()))
            off += nbytes
        qk, sk, qv, sv, pos = parts
        return dequantize(qk, sk, dtype), dequantize(qv, sv, dtype), pos

    # ---- recall scoring ----------------------------------------------------------------------------------
    def score(self, queries: torch.Tensor, groups: int | None = None,
              query_positions: torch.Tensor | None = None) -> tuple[list[int], torch.Tensor]:
        """Per-frame similarity of the question's queries [layers, q_heads, q, D] to the representative keys.

        score(frame) = mean over layers and query heads of (max over query tokens and representative keys of
        q . rep / sqrt(D)), where query head h reads KV head h // groups (GQA). With de-rotated representatives
        (rep_tokens > 0), the queries are turned back by query_positions [q] first. Returns (frame_ids, scores).
        """
        ids = list(self.frames)
        if not ids:
            return ids, torch.zeros(0)
        groups = groups or queries.shape[1] // self.heads
        queries = queries.float().cpu()
        if self.rep_tokens:
            if query_positions is None:
                raise ValueError("de-rotated representatives (rep_tokens > 0) need the queries' positions")
            queries = turn(queries, -query_positions.cpu(), self.inv_freq)
        reps = torch.stack([self.frames[i].rep for i in ids])  # [F, L, Hkv, m, D]
        reps = reps.repeat_interleave(groups, dim=2)  # [F, L, Hq, m, D]
        dots = torch.einsum("lhqd,flhmd->flhqm", queries, reps) / math.sqrt(self.head_dim)
        return ids, dots.amax(dim=(3, 4)).mean(dim=(1, 2))

    def top(self, queries: torch.Tensor, k: int, groups: int | None = None,
            query_positions: torch.Tensor | None = None) -> list[int]:
        """The k best-scoring frame ids, best first."""
        ids, scores = self.score(queries, groups, query_positions)
        order = torch.argsort(scores, descending=True, stable=True)[:k]
        return [ids[i] for i in order.tolist()]

    # ---- persistence of the index ------------------------------------------------------------------------
    def state(self) -> dict:
        """JSON-able index (representative keys as base64 fp32) for a snapshot; pages stay where they are."""
        return {
            "version": STATE_VERSION,
            "config": dict(max_bytes=self.max_bytes, layers=self.layers, heads=self.heads,
                           head_dim=self.head_dim, rows=self.rows, rep_tokens=self.rep_tokens),
            "inv_freq": None if self.inv_freq is None else self.inv_freq.tolist(),
            "counters": dict(write_errors=self.write_errors, damaged=self.damaged, skipped=self.skipped,
                             dropped=self.dropped),
            "stopped": self.stopped,
            "frames": [dict(frame_id=e.frame_id, stamp=e.stamp, n=e.n, pos_min=e.pos_min, pos_max=e.pos_max,
                            file=e.file, nbytes=e.nbytes,
                            rep=base64.b64encode(e.rep.numpy().astype("<f4").tobytes()).decode("ascii"))
                       for e in self.frames.values()],
        }

    @classmethod
    def open(cls, path: str, state: dict, fsync: bool = False) -> "FrameArchive":
        """Reopen an archive from state(). Pages that are missing or of the wrong size count as damaged;
        files the index does not name (e.g. a page written after the snapshot) are removed."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"archive state version {state.get('version')} != {STATE_VERSION}")
        inv = state.get("inv_freq")
        self = cls(path, fsync=fsync, _clear=False, inv_freq=None if inv is None else torch.tensor(inv),
                   **state["config"])
        for key, value in state["counters"].items():
            setattr(self, key, int(value))
        # `stopped` is not restored on purpose: a disk fault before the snapshot may be gone after a restart
        shape = (self.layers, self.heads, -1, self.head_dim)
        for f in state["frames"]:
            full = os.path.join(self.path, f["file"])
            if not os.path.isfile(full) or os.path.getsize(full) != f["nbytes"]:
                self.damaged += 1
                continue
            rep = torch.from_numpy(np.frombuffer(base64.b64decode(f["rep"]), dtype="<f4").copy()).reshape(shape)
            self.frames[int(f["frame_id"])] = FrameEntry(int(f["frame_id"]), float(f["stamp"]), int(f["n"]),
                                                         int(f["pos_min"]), int(f["pos_max"]), f["file"],
                                                         int(f["nbytes"]), rep)
            self.used_bytes += int(f["nbytes"])
        known = {e.file for e in self.frames.values()}
        for name in os.listdir(self.path):
            if (name.endswith(SUFFIX) or name.endswith(SUFFIX + ".tmp")) and name not in known:
                os.remove(os.path.join(self.path, name))
        return self

    def disk_bytes(self) -> int:
        """Sum of the page files' sizes as the filesystem reports them."""
        return sum(os.path.getsize(os.path.join(self.path, n)) for n in os.listdir(self.path)
                   if n.endswith(SUFFIX))

    def stats(self) -> dict:
        return dict(frames=len(self.frames), used_bytes=self.used_bytes, max_bytes=self.max_bytes,
                    write_errors=self.write_errors, damaged=self.damaged, skipped=self.skipped,
                    dropped=self.dropped, stopped=self.stopped)

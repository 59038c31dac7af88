"""Snapshot and restore of a StreamingSession: the bounded cache, the session's stream state and the archive index
in one file, written atomically, so a node restart resumes the same conversation (same logits).

File layout: MAGIC (8 bytes), header length (u32 little-endian), header (UTF-8 JSON), payload (torch.save bytes).
The header holds what restore checks before it reads the payload: format version, model fingerprint, CacheConfig,
dtype, the cache tensors' names / shapes / dtypes, the payload's length and SHA-256; plus, for people, the model
path and the torch / transformers versions that wrote it.

What is saved, generically so new cache fields travel without a change here:
  * every public tensor attribute of the cache; those shaped [layers, heads, capacity, ...] only up to `stored`
    (the slots past it are dead: every forward overwrites them), others whole;
  * every public int / float / bool attribute of the cache and of each layer (seen, stored, scored, forward_id,
    next_position, chunks, evictions, decoded, turned, ...);
  * the session's pending tokens, counters, chunk map (engine/memory_view.py), sampling generator state and the
    model's position state that the adapter's reset() clears (Qwen2-VL `rope_deltas`);
  * the frame archive's index and recall bookkeeping, with its pages hard-linked beside the snapshot
    (engine/snapshot_archive.py: why and how).

Atomicity: the bytes go to a temporary file in the target's directory, are fsynced, renamed over the target
(os.replace) and the directory is fsynced; a crash (SIGKILL, power loss) at any moment leaves either the previous
snapshot or the new one, never a mix. Temporary files a killed save left behind are removed by the next save.

Restore validates everything (file, checksum, fingerprint, config, dtype, tensor layout) before it touches the
session; any failure raises a SnapshotError subclass and leaves the session reset (a fresh start).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
import tempfile

import torch

from infmllm_ros.engine import memory_view
from infmllm_ros.engine import snapshot_archive as archive_part
from infmllm_ros.engine.errors import SnapshotCorruptError, SnapshotError, SnapshotMismatchError

MAGIC = b"INFMSNAP"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sI")
_MAX_HEADER = 64 << 20  # a header is a few kB; anything near this is a damaged length field
_SCALARS = (bool, int, float)
_TMP_SUFFIX = ".snaptmp"


# ---- what identifies the model ---------------------------------------------------------------------------------
def model_fingerprint(model) -> str:
    """SHA-256 over the model config (paths and versions left out) and a strided sample of every parameter
    (64 values each, as fp32): another checkpoint of the same architecture differs, a moved directory does not."""
    cfg = _drop_volatile(model.config.to_dict())
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().contiguous()
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


_VOLATILE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash")


def _drop_volatile(cfg):
    """The config without where it was loaded from and what wrote it (also in nested sub-configs)."""
    if isinstance(cfg, dict):
        return {k: _drop_volatile(v) for k, v in cfg.items() if k not in _VOLATILE}
    return cfg


# ---- gathering the state ---------------------------------------------------------------------------------------
def _cache_tensors(cache) -> dict[str, torch.Tensor]:
    """Public tensor attributes by name; one that IS an earlier one (a read copy that is the keys) counts once."""
    out: dict[str, torch.Tensor] = {}
    for k, v in vars(cache).items():
        if isinstance(v, torch.Tensor) and not k.startswith("_") and not any(v is t for t in out.values()):
            out[k] = v
    return out


def _scalars(obj) -> dict:
    return {k: v for k, v in vars(obj).items() if type(v) in _SCALARS and not k.startswith("_")}


def _slot_dims(cache) -> tuple[int, int, int]:
    layers, heads = cache.keys.shape[:2]
    return int(layers), int(heads), int(cache.config.capacity)


def _sliced(t: torch.Tensor, dims) -> bool:
    return t.dim() >= 3 and tuple(t.shape[:3]) == dims


def _model_position_state(session):
    """The per-stream position state a family keeps in the model (what adapter.reset() clears)."""
    inner = getattr(session.model, "model", None)
    return inner if inner is not None and hasattr(inner, "rope_deltas") else None


def _layout(session) -> dict:
    return {name: {"shape": list(t.shape), "dtype": str(t.dtype)} for name, t in _cache_tensors(session.cache).items()}


def _header(session, payload) -> dict:
    import transformers

    return {
        "format_version": FORMAT_VERSION,
        "model": str(getattr(session.model.config, "_name_or_path", "") or type(session.model).__name__),
        "model_type": str(getattr(session.model.config, "model_type", "")),
        "model_fingerprint": model_fingerprint(session.model),
        "cache_config": dataclasses.asdict(session.cfg),
        "dtype": str(session.dtype),
        "tensors": _layout(session),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "frames_seen": int(session.counters.frames_seen),
        "tokens_seen": int(session.cache.get_seq_length()),
        "tokens_stored": int(session.cache.stored),
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }


def _payload(session) -> dict:
    cache = session.cache
    stored = {int(layer.stored) for layer in cache.layers}
    if len(stored) != 1:
        raise SnapshotError(f"cannot save: the cache layers hold different token counts {sorted(stored)}")
    n, dims = stored.pop(), _slot_dims(cache)
    # one host copy each, compact (torch.save of a view would write the whole buffer behind it), no device copy
    tensors = {k: (t[:, :, :n] if _sliced(t, dims) else t).detach().to("cpu", copy=True)
               for k, t in _cache_tensors(cache).items()}
    holder = _model_position_state(session)
    return {
        "cache": {"tensors": tensors, "stored": n, "scalars": _scalars(cache),
                  "layers": [_scalars(layer) for layer in cache.layers]},
        "session": {
            "pending": [int(t) for t in session._pending],
            "counters": dataclasses.asdict(session.counters),
            "spans": [dataclasses.asdict(s) for s in session.chunk_map.spans],
            "generator": session.generator.get_state(),
            "rope_deltas": (None if holder is None or holder.rope_deltas is None
                            else holder.rope_deltas.detach().cpu().clone()),
        },
        "memory": archive_part.state(session),
    }


# ---- save ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def save(session, path) -> dict:
    """Write the session to `path` atomically. Returns {"path", "bytes", "frames_seen", "tokens_stored"}.
    Raises SnapshotError (the previous file at `path`, if any, is untouched)."""
    if getattr(session, "_broken", None):
        raise SnapshotError(f"cannot save: the session is inconsistent after a failed forward ({session._broken}); "
                            "call reset()")
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise SnapshotError(f"cannot save snapshot {path}: directory {directory} does not exist")
    state = _payload(session)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()  # no second copy of the serialized state
    pages = None
    try:
        _remove_stale_temps(path)
        pages = archive_part.link_pages(session, path, state["memory"])
        header = json.dumps(dict(_header(session, payload), archive_pages=pages), sort_keys=True).encode()
        size = _write_atomic(path, [_HEAD.pack(MAGIC, len(header)), header, payload])
    except OSError as e:
        if pages:
            archive_part.remove_pages(path, keep=_current_pages(path))
        raise SnapshotError(f"cannot save snapshot {path}: {e.strerror or e}") from e
    archive_part.remove_pages(path, keep=pages)  # the previous save's pages, a killed save's
    return {"path": path, "bytes": size, "frames_seen": int(session.counters.frames_seen),
            "tokens_stored": int(session.cache.stored)}


def _current_pages(path: str) -> str | None:
    """The pages folder the snapshot now at `path` names (kept when a new save fails)."""
    try:
        return read(path)[0].get("archive_pages")
    except SnapshotError:
        return None


def _temp_prefix(path: str) -> str:
    return "." + os.path.basename(path) + "."


def _remove_stale_temps(path: str) -> None:
    directory, prefix = os.path.dirname(path), _temp_prefix(path)
    for name in os.listdir(directory):
        if name.startswith(prefix) and name.endswith(_TMP_SUFFIX):
            try:
                os.remove(os.path.join(directory, name))
            except FileNotFoundError:
                pass


def _write_atomic(path: str, parts: list) -> int:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_temp_prefix(path), suffix=_TMP_SUFFIX)
    try:
        size = 0
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
                size += len(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)  # the rename itself is durable only once the directory entry is on disk
    finally:
        os.close(dfd)
    return size


# ---- read and check --------------------------------------------------------------------------------------------
def read(path) -> tuple[dict, dict]:
    """(header, payload) of a snapshot file; SnapshotCorruptError if it is missing, truncated or damaged."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SnapshotCorruptError(f"cannot read snapshot {path}: {e.strerror or e}") from e

    def corrupt(why):
        return SnapshotCorruptError(f"snapshot {path} is {why}; start fresh or save a new one")

    if len(data) < _HEAD.size:
        raise corrupt(f"truncated ({len(data)} bytes, not even a header)")
    magic, n = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise corrupt("not an infmllm_ros snapshot (bad magic)")
    if n > min(_MAX_HEADER, len(data) - _HEAD.size):
        raise corrupt(f"truncated or damaged (header of {n} bytes, file of {len(data)})")
    try:
        header = json.loads(data[_HEAD.size:_HEAD.size + n].decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise corrupt(f"damaged (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise corrupt("damaged (header is not a JSON object)")
    if header.get("format_version") != FORMAT_VERSION:
        raise SnapshotMismatchError(f"snapshot {path} has format version {header.get('format_version')!r}; this "
                                    f"build reads version {FORMAT_VERSION}")
    body = data[_HEAD.size + n:]
    if len(body) != header.get("payload_bytes"):
        raise corrupt(f"truncated (payload of {len(body)} bytes, header says {header.get('payload_bytes')})")
    if hashlib.sha256(body).hexdigest() != header.get("payload_sha256"):
        raise corrupt("damaged (payload checksum mismatch)")
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as e:  # the checksum matched, so this is a writer bug or a foreign file
        raise corrupt(f"unreadable ({type(e).__name__}: {e})") from None
    return header, payload


def check(session, header: dict, path: str = "snapshot") -> None:
    """SnapshotMismatchError unless the snapshot was written with the same dtype, model, cache config and cache
    layout (checked in that order: the fingerprint samples the weights as they are, so a dtype change would
    otherwise read as another model; another family would otherwise read as another cache config)."""
    def mismatch(what, theirs, ours):
        return SnapshotMismatchError(f"{path} was saved with {what} {theirs}, this session has {ours}: it cannot "
                                     "be restored here (start fresh, or run the model / parameters it was saved with)")

    if header.get("dtype") != str(session.dtype):
        raise mismatch("dtype", header.get("dtype"), str(session.dtype))
    fp = model_fingerprint(session.model)
    if header.get("model_fingerprint") != fp:
        raise mismatch("model", f"{header.get('model')!r} (fingerprint {str(header.get('model_fingerprint'))[:12]})",
                       f"{getattr(session.model.config, '_name_or_path', '')!r} (fingerprint {fp[:12]})")
    ours = dataclasses.asdict(session.cfg)
    theirs = header.get("cache_config") or {}
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diff:
        raise mismatch("cache config", {k: theirs.get(k) for k in diff}, {k: ours.get(k) for k in diff})
    layout = _layout(session)
    if header.get("tensors") != layout:
        raise mismatch("cache tensors", header.get("tensors"), layout)


# ---- restore ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def restore(session, path) -> dict:
    """Replace the session's state by the snapshot at `path`. Returns its header. On any failure the session is
    reset (a fresh start) and a SnapshotError subclass says why."""
    path = os.fspath(path)
    try:
        header, payload = read(path)
        check(session, header, path)
        _check_payload(session, payload, path)
        session.reset()
        _apply(session, payload)
        archive_part.apply(session, payload.get("memory"), path, header.get("archive_pages"))
    except SnapshotError:
        session.reset()
        raise
    except Exception as e:  # a payload that passed the checks but does not fit: still a clear error, never a crash
        session.reset()
        raise SnapshotCorruptError(f"snapshot {path} could not be applied ({type(e).__name__}: {e}); the session "
                                   "starts fresh") from e
    return header


def _check_payload(session, payload, path: str) -> None:
    try:
        tensors, n = payload["cache"]["tensors"], int(payload["cache"]["stored"])
        layers = payload["cache"]["layers"]
        payload["session"]["pending"], payload["session"]["counters"], payload["session"]["spans"]
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotCorruptError(f"snapshot {path} lacks part of its state ({e!r})") from None
    cache = session.cache
    dims = _slot_dims(cache)
    if not 0 <= n <= dims[2] or len(layers) != len(cache.layers):
        raise SnapshotCorruptError(f"snapshot {path}: {n} stored tokens / {len(layers)} layers do not fit this cache")
    for name, ours in _cache_tensors(cache).items():
        t = tensors.get(name)
        want = (dims[0], dims[1], n, *ours.shape[3:]) if _sliced(ours, dims) else tuple(ours.shape)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want or t.dtype != ours.dtype:
            got = None if not isinstance(t, torch.Tensor) else (tuple(t.shape), str(t.dtype))
            raise SnapshotCorruptError(f"snapshot {path}: cache tensor {name} is {got}, expected {(want, ours.dtype)}")
    archive_part.check(session, payload.get("memory"), path)


def _set_scalars(obj, values: dict) -> None:
    for k, v in values.items():
        if k in vars(obj) and type(getattr(obj, k)) is type(v):
            setattr(obj, k, v)


def _apply(session, payload: dict) -> None:
    cache, c = session.cache, payload["cache"]
    dims = _slot_dims(cache)
    for name, ours in _cache_tensors(cache).items():  # in place: the layers hold views of these buffers
        (ours[:, :, : c["stored"]] if _sliced(ours, dims) else ours).copy_(c["tensors"][name])
    _set_scalars(cache, c["scalars"])
    for layer, values in zip(cache.layers, c["layers"], strict=True):
        _set_scalars(layer, values)
    if getattr(cache, "turned", False) and hasattr(cache, "invalidate_read_keys"):
        cache.invalidate_read_keys()  # the read copy of the keys is rebuilt from keys + offset, not trusted from disk
    s = payload["session"]
    session._pending = [int(t) for t in s["pending"]]
    fields = {f.name for f in dataclasses.fields(session.counters)}
    session.counters = type(session.counters)(**{k: v for k, v in s["counters"].items() if k in fields})
    session.chunk_map.spans = [memory_view.Span(**d) for d in s["spans"]]
    session.generator.set_state(s["generator"])
    holder = _model_position_state(session)
    if holder is not None:
        deltas = s.get("rope_deltas")
        holder.rope_deltas = None if deltas is None else deltas.to(session.device)


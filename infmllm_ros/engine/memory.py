"""Memory known up front: free bytes on the device, weights estimated from safetensors headers, a fit check."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from infmllm_ros.engine.errors import InsufficientMemoryError

_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}


def free_bytes(device: str | torch.device) -> int:
    """Bytes free now: cudaMemGetInfo on CUDA; MemAvailable (/proc/meminfo) or sysconf pages on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def weight_params_on_disk(path: str | os.PathLike) -> int | None:
    """Parameter count from the safetensors headers of a local dir (no tensor is read); None if unknown."""
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return None
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for d in meta["shape"]:
                    count *= d
                n += count
    return n


def weight_params(path: str) -> int | None:
    """Parameter count of a local dir, a hub id already in the local cache, or (online) the hub's safetensors
    metadata; None when unknown (the KV check after loading still runs)."""
    n = weight_params_on_disk(path)
    if n is not None or Path(path).is_dir():
        return n
    try:
        from huggingface_hub import snapshot_download

        return weight_params_on_disk(snapshot_download(path, local_files_only=True))
    except Exception:  # not cached
        pass
    try:
        from huggingface_hub import get_safetensors_metadata

        return int(sum(get_safetensors_metadata(path).parameter_count.values()))
    except Exception:  # offline, or no safetensors
        return None


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def check_fits(need: int, device: str | torch.device, what: str, headroom: float = 0.1) -> None:
    """Raise InsufficientMemoryError unless `need` * (1 + headroom) bytes are free on `device`."""
    free = free_bytes(device)
    if need * (1.0 + headroom) > free:
        raise InsufficientMemoryError(
            f"{what} need {need / 2**20:.1f} MiB (+{headroom:.0%} headroom) but only {free / 2**20:.1f} MiB are free "
            f"on {device}; lower the cache budget/max_chunk/max_new_tokens, use a smaller dtype or model")

"""Memory known up front: free bytes on the device, weights estimated from safetensors headers, a fit check."""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import torch

from infmllm_ros.engine.errors import InsufficientMemoryError

log = logging.getLogger(__name__)

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
            f"on {device}; lower cache.budget / cache.budget_frames / cache.max_chunk / generation.max_new_tokens "
            f"(node parameters; CacheConfig fields in Python), or use a smaller dtype or model")


# -- cache auto-sizing (node parameters cache.budget 0 / cache.budget_frames / cache.max_chunk 0) ------------------
AUTO_MARGIN = 0.10  # share of the free device memory (after weights) that an automatic budget leaves unused
ACTIVATION_RESERVE = 1 << 30  # bytes also left free on CUDA for one chunk's activations and the vision tower
INSTRUCTION_TOKENS = 256  # auto max_chunk is never below this, so instructions up to it are not truncated
MIN_AUTO_BUDGET = 512  # an automatic budget is never below the former fixed default (small-frame models keep it)


def _slot_bytes(kw: dict, model_config, dtype) -> float:
    """KV bytes per cache slot (all layers, K and V, plus whatever per-slot state the cache class keeps)."""
    from infmllm_ros.cache import BoundedCache, CacheConfig

    probe = dict(kw, budget=max(int(kw.get("recent", 0)) + int(kw.get("sinks", 0)), 1))
    cfg = CacheConfig(**probe)
    return BoundedCache.kv_bytes_for(cfg, model_config, dtype) / cfg.capacity


def size_cache(kw: dict, *, tokens_per_frame: int, max_frame_tokens: int, budget_frames: int, model_config,
               dtype, device) -> dict:
    """Resolve the automatic cache sizes into CacheConfig keyword arguments.

    max_chunk 0 -> the largest frame chunk over the reference shapes, at least INSTRUCTION_TOKENS;
    window 0 -> CacheConfig's default; budget 0 -> on CUDA what fits the free memory after the weights, minus
    AUTO_MARGIN of it and ACTIVATION_RESERVE; elsewhere budget_frames frames of tokens_per_frame tokens (at least
    MIN_AUTO_BUDGET). An automatic budget is capped so budget + max_chunk + max_new_tokens stays within the model's
    max_position_embeddings."""
    kw = dict(kw)
    if not int(kw.get("max_chunk") or 0):
        kw["max_chunk"] = max(int(max_frame_tokens), INSTRUCTION_TOKENS)
    if not int(kw.get("window") or 0):
        kw.pop("window", None)
    protected = int(kw.get("recent", 64)) + int(kw.get("sinks", 0))
    if int(kw.get("budget") or 0):
        return kw
    extra = int(kw["max_chunk"]) + int(kw.get("max_new_tokens", 64))
    if torch.device(device).type == "cuda":
        per_slot = _slot_bytes(kw, model_config, dtype)
        usable = free_bytes(device) * (1.0 - AUTO_MARGIN) - ACTIVATION_RESERVE
        budget = int(usable // per_slot) - extra
        if budget < protected:
            raise InsufficientMemoryError(
                f"cache.budget 0 (auto): {usable / 2**20:.0f} MiB usable on {device} after the weights holds "
                f"{max(int(usable // per_slot), 0)} KV slots of {per_slot / 1024:.1f} KiB, fewer than cache.recent + "
                f"cache.sinks + cache.max_chunk + max_new_tokens = {protected + extra}: use a smaller model or dtype, "
                f"or lower cache.recent / frame.tokens")
        how = f"fits {usable / 2**30:.2f} GiB free after weights (margin {AUTO_MARGIN:.0%} + 1 GiB)"
    else:
        budget = max(int(budget_frames) * int(tokens_per_frame), MIN_AUTO_BUDGET)
        if budget < protected:
            need = -(-protected // max(int(tokens_per_frame), 1))
            raise ValueError(f"cache.budget_frames {budget_frames} x {tokens_per_frame} tokens per frame "
                             f"(at least {MIN_AUTO_BUDGET}) < cache.recent + cache.sinks = {protected}: set "
                             f"cache.budget_frames to {need} or more, or cache.budget to {protected} or more")
        how = f"{budget_frames} frames x {tokens_per_frame} tokens, at least {MIN_AUTO_BUDGET}"
    limit = _max_positions(model_config)
    if limit and budget + extra > limit:
        budget, how = max(limit - extra, protected), how + f", capped by max_position_embeddings {limit}"
    kw["budget"] = budget
    log.info("cache.budget auto = %d tokens (%s)", budget, how)
    return kw


def _max_positions(model_config) -> int | None:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return getattr(text, "max_position_embeddings", None)

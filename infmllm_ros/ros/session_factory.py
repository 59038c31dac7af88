"""How the node gets its session: one small factory, so tests and users can inject another one.

``make_session(params)`` builds the real :class:`infmllm_ros.engine.StreamingSession` from the node's
parameters. The ``session_factory`` parameter (``"module:callable"``) replaces it: the callable receives the
same ``params`` dict and returns any object with the session's interface (``observe``, ``ask``, ``reset``,
``stats``; optionally ``tokenizer`` or ``processor.tokenizer`` for constrained action decoding). The node's
tests use that to run the node in its own process with a scripted session.

``model`` values: a Hugging Face id or a local directory (``StreamingSession.from_pretrained``),
``tiny:<family>[:seed]`` for the offline random-weight models of ``infmllm_ros.engine.tiny`` (tests, demos), or
``""`` for the VLM embedded in the package (``infmllm_ros/assets/robot_vlm``, see :func:`embedded_model`).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

_DTYPES = ("auto", "float32", "float16", "bfloat16")


def cache_config_kwargs(params: dict) -> dict:
    """``cache.*`` parameters -> CacheConfig keyword arguments (only the fields CacheConfig has). 0 in
    ``cache.budget`` / ``cache.max_chunk`` / ``cache.window`` means automatic (see memory.size_cache)."""
    from infmllm_ros.cache import CacheConfig

    fields = {f.name for f in dataclasses.fields(CacheConfig)}
    out = {k[len("cache."):]: v for k, v in params.items() if k.startswith("cache.") and k[len("cache."):] in fields}
    if "max_new_tokens" in fields:  # the cache must hold the longest answer the node will ask for
        out["max_new_tokens"] = max(int(params.get("generation.max_new_tokens", 0)),
                                    int(params.get("actions.max_new_tokens", 0)), int(out.get("max_new_tokens", 0)))
    return out


def torch_dtype(name: str, device: str, checkpoint=None):
    """The dtype parameter -> a torch dtype. "auto": float32 on CPU; on CUDA the checkpoint's own half type
    (loading.auto_dtype of `checkpoint`, a path or config), bfloat16 when none is given."""
    import torch

    if name not in _DTYPES:
        raise ValueError(f"parameter 'dtype' must be one of {_DTYPES}, got {name!r}")
    if name == "auto":
        if checkpoint is None or not str(device).startswith("cuda"):
            return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        from infmllm_ros.engine import loading

        return loading.auto_dtype(checkpoint, device)
    return getattr(torch, name)


def sized_cache(params: dict, model, processor, device, dtype):
    """CacheConfig for this model with the automatic sizes resolved, and the frame settings it was sized for."""
    from infmllm_ros.cache import CacheConfig
    from infmllm_ros.engine import memory
    from infmllm_ros.engine.adapters import adapter_for

    frame_tokens = int(params.get("frame.tokens", 256)) or None
    max_side = int(params.get("frame.max_side", 0)) or None
    adapter = adapter_for(model, processor)
    adapter.configure_frames(frame_tokens, max_side)
    tpf = adapter.frame_chunk_tokens(adapter.REFERENCE_SHAPES[0])
    worst = max(adapter.frame_chunk_tokens(s) for s in adapter.REFERENCE_SHAPES)
    kw = memory.size_cache(cache_config_kwargs(params), tokens_per_frame=tpf, max_frame_tokens=worst,
                           budget_frames=int(params.get("cache.budget_frames", 8)), model_config=model.config,
                           dtype=dtype, device=device)
    try:
        cfg = CacheConfig(**kw)
    except ValueError as e:  # CacheConfig names its fields; the node user sets cache.<field>
        raise ValueError(f"node parameters cache.*: {e}") from None
    return cfg, frame_tokens, max_side


def make_session(params: dict) -> Any:
    """The real session, from the node's parameters (model, device, dtype, frame.*, cache.*, system_prompt).

    Real checkpoints get frame.tokens / frame.max_side; ``tiny:`` models keep their fixed small frames (they are
    test models) but the cache is sized the same way."""
    import torch

    from infmllm_ros.engine import StreamingSession, loading, memory

    model = str(params.get("model", "")).strip()
    device = str(params.get("device", "cpu"))
    dtype_name = str(params.get("dtype", "auto"))
    torch_dtype(dtype_name, device)  # validate before loading anything
    system_prompt = str(params.get("system_prompt", "")) or None
    if model.startswith("tiny:"):
        from infmllm_ros.engine.tiny import tiny_model

        family, _, seed = model[len("tiny:"):].partition(":")
        m, proc = tiny_model(family, int(seed or 0))
        dtype = torch_dtype(dtype_name, device, m.config)
        m = m.to(device=device, dtype=dtype)
        cfg, _, _ = sized_cache(dict(params, **{"frame.tokens": 0, "frame.max_side": 0}), m, proc, device, dtype)
        return StreamingSession(m, proc, cache=cfg, device=device, dtype=dtype, system_prompt=system_prompt,
                                **recall_kwargs(params))
    if not model:
        model = embedded_model()
        if not model:
            raise ValueError("parameter 'model' is empty and no embedded model ships with this install: set a "
                             "Hugging Face id, a local directory or tiny:<family>")
    loading.check_source(model)
    n_params = memory.weight_params(model)
    dtype = torch_dtype(dtype_name, device, model)
    if n_params is not None:  # refuse before reading any weight
        memory.check_fits(n_params * torch.empty((), dtype=dtype).element_size(), device, "model weights")
    m, proc = loading.load(model, device=device, dtype=dtype)
    cfg, frame_tokens, max_side = sized_cache(params, m, proc, device, dtype)
    return StreamingSession(m, proc, cache=cfg, device=device, dtype=dtype, system_prompt=system_prompt,
                            frame_tokens=frame_tokens, frame_max_side=max_side, **recall_kwargs(params))


def recall_kwargs(params: dict) -> dict:
    """``memory.recall_frames`` / ``memory.archive_mb`` / ``memory.archive_dir`` -> StreamingSession kwargs (long-term
    memory, memory/recall.py). An empty archive_dir is $ROS_HOME/infmllm_ros/archive (ROS_HOME defaults to ~/.ros)."""
    import os

    frames = int(params.get("memory.recall_frames", 0))
    if not frames:
        return {}
    folder = str(params.get("memory.archive_dir", "")).strip() or os.path.join(
        os.environ.get("ROS_HOME") or os.path.join(os.path.expanduser("~"), ".ros"), "infmllm_ros", "archive")
    return dict(recall_frames=frames, archive_mb=float(params.get("memory.archive_mb", 256.0)),
                archive_dir=os.path.expanduser(folder),
                recall_placement=str(params.get("memory.recall_placement", "past")))


def embedded_model() -> str:
    """The VLM shipped inside the package, or ``""``: ``infmllm_ros/assets/robot_vlm`` (written by
    ``infmllm-bench train-vlm``), else the first ``assets/<name>/`` whose config.json names a supported VLM family
    (text-only models there, such as the benchmark's ``kjv_lm``, are skipped)."""
    import json
    from pathlib import Path

    import infmllm_ros

    assets = Path(infmllm_ros.__file__).resolve().parent / "assets"
    if (assets / "robot_vlm" / "config.json").is_file():
        return str(assets / "robot_vlm")
    if not assets.is_dir():
        return ""
    from infmllm_ros.engine.loading import MODEL_TYPES

    for cfg in sorted(assets.glob("*/config.json")):
        try:
            if json.loads(cfg.read_text()).get("model_type") in MODEL_TYPES:
                return str(cfg.parent)
        except (OSError, ValueError):
            continue
    return ""


def load_factory(spec: str):
    """``"module:callable"`` -> the callable (``""`` -> :func:`make_session`)."""
    if not spec:
        return make_session
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"session_factory must be 'module:callable', got {spec!r}")
    fn = getattr(importlib.import_module(mod), attr)
    if not callable(fn):
        raise ValueError(f"session_factory {spec!r} is not callable")
    return fn


def tokenizer_of(session) -> Any | None:
    """The HF tokenizer behind a session, if it exposes one (for constrained action decoding)."""
    tok = getattr(session, "tokenizer", None)
    if tok is None:
        tok = getattr(getattr(session, "processor", None), "tokenizer", None)
    return tok

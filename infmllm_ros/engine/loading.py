"""Model + processor loading from a local directory or a hub id, picking classes by the config's model_type.

Why not Auto*: AutoProcessor on a LlavaOnevision dir silently returns only the tokenizer, and processors that own a
video processor cannot be built without torchvision. We name the classes per family instead (see processors.py).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch
import transformers
from transformers import AutoConfig

from infmllm_ros.engine import processors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FamilyClasses:
    model: str  # class name in transformers
    processor: type | str  # our image-only subclass, or a transformers class name


# model_type (config.json) -> classes. Real SmolVLM (v1) checkpoints say "idefics3"; SmolVLM2 says "smolvlm".
MODEL_TYPES: dict[str, FamilyClasses] = {
    "llava": FamilyClasses("LlavaForConditionalGeneration", "LlavaProcessor"),
    "llava_onevision": FamilyClasses("LlavaOnevisionForConditionalGeneration",
                                     processors.OnevisionImageOnlyProcessor),
    "idefics3": FamilyClasses("Idefics3ForConditionalGeneration", "Idefics3Processor"),
    "smolvlm": FamilyClasses("SmolVLMForConditionalGeneration", processors.SmolVLMImageOnlyProcessor),
    "qwen2_vl": FamilyClasses("Qwen2VLForConditionalGeneration", processors.Qwen2VLImageOnlyProcessor),
    "qwen2_5_vl": FamilyClasses("Qwen2_5_VLForConditionalGeneration", processors.Qwen2_5_VLImageOnlyProcessor),
}


def looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id ("org/name"): absolute, relative, home-relative, or deeper than one /."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.path.exists(path)


def check_source(path: str) -> None:
    """One-line errors instead of HF's "Repo id must be in the form ..." for local paths that do not exist."""
    p = os.path.expanduser(path)
    if looks_local(path):
        if not os.path.isdir(p):
            raise FileNotFoundError(f"model directory {path!r} does not exist (parameter 'model')")
        if not os.path.isfile(os.path.join(p, "config.json")):
            raise FileNotFoundError(f"model directory {path!r} has no config.json (parameter 'model')")


def model_type_of(path: str) -> str:
    check_source(path)
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(path)).model_type
    except OSError as e:  # hub id not in the local cache while offline, or unknown id
        raise FileNotFoundError(f"cannot load model {path!r}: not a local directory and not loadable from the "
                                f"Hugging Face cache/hub ({str(e).splitlines()[0]})") from None


def auto_dtype(path_or_config, device) -> torch.dtype:
    """dtype "auto": the checkpoint's own half type (bfloat16 / float16) on CUDA, bfloat16 if it says float32 or
    nothing; float32 on CPU (half-precision matmuls are slow there and CPU runs are tests and demos)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    cfg = path_or_config if not isinstance(path_or_config, str) else AutoConfig.from_pretrained(path_or_config)
    name = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "").replace("torch.", "")
    return torch.float16 if name == "float16" else torch.bfloat16


def classes_for(model_type: str) -> tuple[type, type]:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(MODEL_TYPES)}")
    fc = MODEL_TYPES[model_type]
    model_cls = getattr(transformers, fc.model)
    proc_cls = getattr(transformers, fc.processor) if isinstance(fc.processor, str) else fc.processor
    if proc_cls is None:
        raise ValueError(f"this transformers version has no processor for {model_type!r}")
    return model_cls, proc_cls


def load_processor(path: str):
    _, proc_cls = classes_for(model_type_of(path))
    return proc_cls.from_pretrained(os.path.expanduser(path))


def load(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **model_kwargs):
    """Load (model, processor) from a local dir or hub id; model in eval mode on `device`, dtype None = auto.

    On CUDA with accelerate installed, weights are placed on the GPU while they are read (device_map), so the load
    never holds a full CPU copy; without accelerate they are read to CPU, then moved (and a warning says so)."""
    model_cls, proc_cls = classes_for(model_type_of(path))
    local = os.path.expanduser(path)
    dtype = dtype or auto_dtype(local, device)
    device = torch.device(device)
    if device.type == "cuda" and "device_map" not in model_kwargs:
        if importlib.util.find_spec("accelerate") is not None:
            model_kwargs["device_map"] = {"": str(device)}
        else:
            log.warning("accelerate is not installed: the weights pass through CPU memory before %s "
                        "(pip install accelerate loads them straight to the GPU)", device)
    model = model_cls.from_pretrained(local, dtype=dtype, **model_kwargs)
    if "device_map" not in model_kwargs:
        model = model.to(device)
    model = model.eval()
    processor = proc_cls.from_pretrained(local)
    return model, processor

"""Model + processor loading from a local directory or a hub id, picking classes by the config's model_type.

Why not Auto*: AutoProcessor on a LlavaOnevision dir silently returns only the tokenizer, and processors that own a
video processor cannot be built without torchvision. We name the classes per family instead (see processors.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from transformers import AutoConfig

from infmllm_ros.engine import processors


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


def model_type_of(path: str) -> str:
    return AutoConfig.from_pretrained(path).model_type


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
    return proc_cls.from_pretrained(path)


def load(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **model_kwargs):
    """Load (model, processor) from a local dir or hub id; model in eval mode on `device`."""
    model_cls, proc_cls = classes_for(model_type_of(path))
    model = model_cls.from_pretrained(path, dtype=dtype, **model_kwargs).to(device).eval()
    processor = proc_cls.from_pretrained(path)
    return model, processor

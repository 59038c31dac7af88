"""One adapter per model family; adding a family = one file + one line in ADAPTERS."""

from infmllm_ros.engine.adapters.base import Adapter, Chunk, Turns
from infmllm_ros.engine.adapters.idefics3 import Idefics3Adapter
from infmllm_ros.engine.adapters.llava import LlavaAdapter
from infmllm_ros.engine.adapters.llava_onevision import LlavaOnevisionAdapter
from infmllm_ros.engine.adapters.qwen2_vl import Qwen2VLAdapter

ADAPTERS: dict[str, type[Adapter]] = {}
for _cls in (LlavaAdapter, LlavaOnevisionAdapter, Idefics3Adapter, Qwen2VLAdapter):
    for _t in _cls.model_types:
        ADAPTERS[_t] = _cls


def adapter_for(model, processor) -> Adapter:
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise ValueError(f"no adapter for model_type {model_type!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type](model, processor)


__all__ = ["ADAPTERS", "Adapter", "Chunk", "Turns", "adapter_for"]

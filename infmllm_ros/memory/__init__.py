"""Long-term memory: a bounded on-disk archive of past frames' KV (int8), recalled per question."""

from infmllm_ros.memory.archive import FrameArchive
from infmllm_ros.memory.quant import dequantize, quantize

__all__ = ["FrameArchive", "quantize", "dequantize"]

"""Long-term memory: a bounded on-disk archive of past frames' KV (int8), recalled per question."""

from infmllm_ros.memory.archive import FrameArchive
from infmllm_ros.memory.quant import dequantize, quantize
from infmllm_ros.memory.recall import FrameRecall

__all__ = ["FrameArchive", "FrameRecall", "quantize", "dequantize"]

"""Engine: StreamingSession over transformers VLMs, one adapter per family, tiny offline models for tests."""

from infmllm_ros.engine.errors import (
    CacheFullError,
    InsufficientMemoryError,
    InvalidFrameError,
    InvalidInstructionError,
    SnapshotCorruptError,
    SnapshotError,
    SnapshotMismatchError,
)
from infmllm_ros.engine.session import Answer, StreamingSession

__all__ = ["Answer", "CacheFullError", "InsufficientMemoryError", "InvalidFrameError", "InvalidInstructionError",
           "SnapshotCorruptError", "SnapshotError", "SnapshotMismatchError", "StreamingSession"]

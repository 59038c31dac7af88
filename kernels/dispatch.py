"""Which kernels run: Triton on CUDA when it is installed and not switched off, the torch references otherwise."""

from __future__ import annotations

import os


def triton_ok() -> bool:
    """Triton is used on CUDA unless INFMLLM_ROS_TRITON=0 (a robot whose Triton build fails keeps the torch path)."""
    if os.environ.get("INFMLLM_ROS_TRITON", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:  # a CUDA install without Triton falls back to the reference
        return False
    return True

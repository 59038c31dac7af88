"""Kernels of the bounded cache: Triton on CUDA, a torch reference with the same signature beside each.

Triton modules are imported lazily (only on CUDA, or by the tests under TRITON_INTERPRET=1), so CPU installs need
no Triton at all.
"""

from .compact import compact_, compact_ref
from .rotate import rotate_keys, rotate_keys_ref
from .window_scores import window_counts, window_scores, window_scores_ref

__all__ = ["compact_", "compact_ref", "rotate_keys", "rotate_keys_ref", "window_counts", "window_scores",
           "window_scores_ref"]  # fmt: skip

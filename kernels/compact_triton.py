"""Triton compaction in place. Same signature and result as `compact.compact_ref`.

One program per row (layer x KV head) walks the kept slots in order, block by block. Safe in place because keep is
increasing: a block's sources are at or after its targets, and every later block's sources lie after this block's
targets. Barriers make each block load everything before anything is stored.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _compact_kernel(K, V, KEEP, M, D, skh, skn, skd, svh, svn, svd, BN: tl.constexpr, BD: tl.constexpr):
    h = tl.program_id(0)
    rd = tl.arange(0, BD)
    dm = rd[None, :] < D
    for start in range(0, M, BN):
        rs = start + tl.arange(0, BN)
        ok = rs < M
        src = tl.load(KEEP + h * M + rs, mask=ok, other=0)
        kk = tl.load(K + h * skh + src[:, None] * skn + rd[None, :] * skd, mask=ok[:, None] & dm, other=0.0)
        vv = tl.load(V + h * svh + src[:, None] * svn + rd[None, :] * svd, mask=ok[:, None] & dm, other=0.0)
        tl.debug_barrier()
        tl.store(K + h * skh + rs[:, None] * skn + rd[None, :] * skd, kk, mask=ok[:, None] & dm)
        tl.store(V + h * svh + rs[:, None] * svn + rd[None, :] * svd, vv, mask=ok[:, None] & dm)
        tl.debug_barrier()


def compact_triton(k, v, keep) -> None:
    rows, m = keep.shape
    keep = keep.contiguous()
    _compact_kernel[(rows,)](k, v, keep, m, k.shape[-1], *k.stride(), *v.stride(), BN=32,
                             BD=max(16, triton.next_power_of_2(k.shape[-1])))  # fmt: skip

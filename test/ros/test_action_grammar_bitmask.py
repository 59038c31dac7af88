"""The CPU fast paths of the xgrammar action constraint (bitmask -> allowed ids, sparse keep / fill / put back, the
ids cache) against xgrammar's own kernel on the same bitmask (the oracle), on synthetic bitmasks covering the cases
the action schema never produces by itself: no allowed id, one bit anywhere in a word (the forced token, the sign
bit), dense masks, bits set past the vocabulary in the last word, logits wider than the vocabulary."""

import numpy as np
import pytest
import torch

xgr = pytest.importorskip("xgrammar")

from infmllm_ros.action_grammar import SPARSE_WORDS, IdsCache, allowed_ids, apply_bitmask_cpu_  # noqa: E402

VOCAB = 1000  # not a multiple of 32: the last word has 24 bits past the vocabulary


def _bitmask(ids=(), words=None):
    bm = xgr.allocate_token_bitmask(1, VOCAB)
    bm.zero_()
    if words is not None:
        bm[0] = torch.from_numpy(np.asarray(words, dtype=np.int64).astype(np.uint32).view(np.int32))
    for i in ids:
        w = bm[0, i // 32].item() & 0xFFFFFFFF
        bm[0, i // 32] = int(np.uint32(w | (1 << (i % 32))).view(np.int32))
    return bm


def _oracle(bm, width, logits):
    ref = logits.clone().view(1, -1)
    xgr.apply_token_bitmask_inplace(ref, bm, vocab_size=VOCAB)
    ref[:, VOCAB:] = float("-inf")
    return ref


def _cases():
    rng = np.random.default_rng(0)
    words = xgr.allocate_token_bitmask(1, VOCAB).shape[1]
    yield "none allowed", _bitmask()
    for i in (0, 31, 32, 63, 517, VOCAB - 1):
        yield f"forced token {i}", _bitmask([i])
    yield "two bits in one word", _bitmask([64, 95])
    yield "sparse random", _bitmask(rng.choice(VOCAB, 40, replace=False).tolist())
    yield "all bits (dense, past the vocabulary too)", _bitmask(words=[0xFFFFFFFF] * words)
    yield "random words (dense)", _bitmask(words=rng.integers(0, 2**32, words).tolist())
    yield "stray bits past the vocabulary only", _bitmask(words=[0] * (words - 1) + [0xFF000000])


@pytest.mark.parametrize("width", [VOCAB, VOCAB + 40])
def test_apply_matches_xgrammar_kernel(width):
    cache = IdsCache()
    gen = torch.Generator().manual_seed(1)
    for name, bm in _cases():
        logits = torch.randn(width, generator=gen)
        ref = _oracle(bm, width, logits)
        for c in (None, cache, cache):  # uncached, cache miss, cache hit
            out = logits.clone().view(1, -1)
            apply_bitmask_cpu_(out, bm, VOCAB, c)
            assert torch.equal(out, ref), name
        finite = torch.nonzero(torch.isfinite(ref[0])).flatten().tolist()
        idx = allowed_ids(bm[0], VOCAB)
        if idx is not None:  # sparse: exactly the ids the kernel keeps, ascending
            assert idx.tolist() == finite, name


def test_dense_masks_take_the_kernel_and_sparse_ones_do_not():
    words = xgr.allocate_token_bitmask(1, VOCAB).shape[1]
    assert words <= SPARSE_WORDS  # at this vocabulary every mask is sparse...
    assert allowed_ids(_bitmask(words=[1] * words)[0], VOCAB) is not None
    big = 32 * (SPARSE_WORDS + 1)  # ...here one more non-zero word than the sparse limit is dense
    row = torch.ones(1, big // 32, dtype=torch.int32)
    assert allowed_ids(row[0], big) is None
    assert allowed_ids(row[0, : SPARSE_WORDS], 32 * SPARSE_WORDS).tolist() == list(range(0, 32 * SPARSE_WORDS, 32))


def test_ids_cache_is_exact_and_bounded():
    cache = IdsCache(max_entries=3)
    ids = [0, 40, 99, 500, 999]
    for i in ids + ids:
        assert cache.lookup(_bitmask([i]), VOCAB).tolist() == [i]
        assert len(cache) <= 3
    bm = _bitmask([7])
    assert cache.lookup(bm, VOCAB).tolist() == [7]
    bm[0, 0] = 1 << 3  # same buffer, new contents: the key is the contents, so the answer follows
    assert cache.lookup(bm, VOCAB).tolist() == [3]
    assert cache.lookup(bm, 3).tolist() == []  # the vocabulary size is part of the key

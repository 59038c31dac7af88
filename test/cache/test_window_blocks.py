"""Window scores in key blocks: equal to a dense fp64 computation for any block size (blocks that do not divide
the key count, GQA, window = whole chunk), and no temporary of size W x N (counted, not timed)."""

import pytest
import torch
from cache_helpers import VOCAB, layer0_qk, make_cache, stream, tiny_lm
from infmllm_ros.kernels import window_scores_ref
from infmllm_ros.kernels.window_scores import block_for
from torch.utils._python_dispatch import TorchDispatchMode


def dense_fp64(q, k, scaling, normalize):
    """The textbook formula at fp64: full W x N softmax, causal with the chunk offset, mean over each KV group."""
    b, hq, w, _ = q.shape
    hkv, n = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    s = (q.double() @ kk.transpose(-1, -2)) * scaling
    i, j = torch.arange(w)[:, None] + n - w, torch.arange(n)[None, :]
    p = s.masked_fill(j > i, float("-inf")).softmax(-1)
    col = p.sum(-2).view(b, hkv, hq // hkv, n).mean(2)
    if normalize:
        col = col / (j[0] <= i).sum(0).double()  # window queries that see each key
    return col


@pytest.mark.parametrize("hq,hkv,w,n,d", [(4, 2, 5, 37, 16), (7, 1, 40, 40, 8), (28, 4, 19, 101, 16),
                                          (4, 4, 1, 23, 8), (6, 3, 64, 130, 12)])  # fmt: skip
@pytest.mark.parametrize("block", [1, 7, 13, 64, None])
@pytest.mark.parametrize("normalize", [True, False])
def test_blocked_scores_equal_dense_fp64(hq, hkv, w, n, d, block, normalize):
    g = torch.Generator().manual_seed(hq * 1000 + w * 10 + n)
    q, k = torch.randn(1, hq, w, d, generator=g) * 2, torch.randn(1, hkv, n, d, generator=g) * 2
    got = window_scores_ref(q, k, d**-0.5, normalize, block=block)
    want = dense_fp64(q, k, d**-0.5, normalize)
    assert got.dtype == torch.float32 and got.shape == (1, hkv, n)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)  # fp32 against fp64


def test_blocked_scores_of_a_bf16_slice_of_queries():
    """The attention function passes the last W rows of a bf16 chunk (a non-contiguous view)."""
    q, k = torch.randn(1, 8, 30, 16).bfloat16(), torch.randn(1, 2, 50, 16).bfloat16()
    got = window_scores_ref(q[:, :, -12:], k, 0.25, block=9)
    assert (got.double() - dense_fp64(q[:, :, -12:], k, 0.25, True)).abs().max().item() < 2e-6


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_peak_temporary_is_one_key_block_not_window_by_stored():
    """28 query heads x a 200-query window over 4000 keys: the dense logits would be 22.4M elements."""
    hq, hkv, w, n, d = 28, 4, 200, 4000, 8
    q, k = torch.randn(1, hq, w, d), torch.randn(1, hkv, n, d)
    for block in (128, None):
        spy = _LargestTensor()
        with spy:
            window_scores_ref(q, k, d**-0.5, block=block)
        blk = block or block_for(hq, w, n)
        assert blk < n
        assert spy.largest <= max(hq * w * blk, q.numel(), k.numel(), hkv * n), (block, spy.largest)
        assert spy.largest * 4 < hq * w * n  # the dense logits: 22.4M elements


def test_block_size_holds_the_element_budget():
    from infmllm_ros.kernels.window_scores import MIN_BLOCK, SCORE_ELEMENTS

    assert block_for(28, 576, 8192) * 28 * 576 <= SCORE_ELEMENTS  # a LLaVA frame over 8K stored tokens
    assert block_for(4, 10, 500) == 500  # small: one block, one QK^T
    assert block_for(64, 4096, 10**6) == MIN_BLOCK


@pytest.mark.parametrize("window,voters", [(0, 11), (4, 4), (50, 11)])
def test_window_zero_means_every_query_of_the_chunk_votes(window, voters):
    """Layer 0's scores in the cache after chunk 2 (11 tokens) = the dense fp64 scores of its last `voters` queries."""
    model = tiny_lm("qwen2")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, VOCAB, (1, 9), generator=g), torch.randint(0, VOCAB, (1, 11), generator=g)
    cache = make_cache(model, policy="saddle", budget=64, recent=2, window=window, max_chunk=16, max_new_tokens=1)
    stream(model, cache, [(a, True), (b, True)])
    q, k = layer0_qk(model, torch.cat([a, b], 1), torch.arange(20)[None])
    want = dense_fp64(q[:, :, -voters:], k, 16**-0.5, True)[0]
    assert (cache.layers[0].window[:, :20].double() - want).abs().max().item() < 1e-6


def test_window_defaults_to_the_whole_chunk():
    from infmllm_ros.cache import CacheConfig

    assert CacheConfig().window == 0

"""Issue 12 items 6 and 7: every latency the session reports lies in [0, wall time]; a forward through the cache
with missing or different position_ids raises; model.generate on a BoundedCache raises a one-line message that
points to StreamingSession."""

import time

import pytest
import torch
from engine_helpers import frame, make_session

from infmllm_ros.cache import BoundedCache, CacheConfig

CFG = CacheConfig(policy="saddle", budget=64, recent=8, window=8, max_chunk=128, max_new_tokens=8)


def test_reported_latencies_are_between_zero_and_wall_time(tiny):
    model, proc = tiny("qwen2_vl")
    s = make_session(model, proc, CFG)
    for i, stamp in enumerate((1764150000.0, 1764150000.5)):  # epoch stamps: t0 must not be the stamp
        t = time.perf_counter()
        s.observe(frame(i), stamp)
        wall = time.perf_counter() - t
        assert 0 <= s.stats()["last_frame_latency_s"] <= wall
    t = time.perf_counter()
    a = s.ask("What do you see?", max_new_tokens=4)
    wall = time.perf_counter() - t
    st = s.stats()
    assert 0 <= a.first_token_s <= a.latency_s <= wall
    assert 0 <= st["last_first_token_s"] <= st["last_answer_latency_s"] <= wall


@pytest.mark.parametrize("fam", ["qwen2_vl", "llava_llama"])
@torch.no_grad()
def test_forward_without_or_with_other_positions_raises(tiny, fam):
    model, proc = tiny(fam)
    s = make_session(model, proc, CFG)  # installs the attention and its position check
    cache = BoundedCache(CFG, model.config)
    ids = torch.tensor([[1, 2, 3]])
    pos = torch.arange(3)[None]
    if cache.rows == 3:
        pos = pos[None].expand(3, 1, 3)
    for bad, match in ((None, "pass position_ids"), (pos + 1, "differ")):
        cache.reset()
        cache.begin_forward(pos, prefill=True)
        with pytest.raises(ValueError, match=match):
            model(input_ids=ids, position_ids=bad, cache=cache, use_cache=True, **cache.forward_kwargs())
    cache.reset()
    cache.begin_forward(pos, prefill=True)  # the announced positions pass
    model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, **cache.forward_kwargs())
    assert cache.stored == 3 and s.cache is not cache


@torch.no_grad()
def test_generate_on_a_bounded_cache_points_to_the_session(tiny):
    model, proc = tiny("llava_llama")
    make_session(model, proc, CFG)
    cache = BoundedCache(CFG, model.config)
    with pytest.raises(RuntimeError, match="StreamingSession") as err:
        model.generate(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=cache, max_new_tokens=2)
    assert "\n" not in str(err.value)

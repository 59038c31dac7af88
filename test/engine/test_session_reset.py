"""reset() really empties the cache: after it, the session answers exactly like a fresh one (logits compared)."""

import torch
from engine_helpers import frame, make_session

from infmllm_ros.cache import CacheConfig


def test_reset_equals_fresh_session(tiny, family):
    model, proc = tiny(family)
    cfg = CacheConfig(policy="saddle", budget=64, recent=16, window=8, max_chunk=128, max_new_tokens=6)
    s = make_session(model, proc, cfg)
    for i in range(6):  # enough to evict and re-index
        s.observe(frame(10 + i), i * 0.5)
    s.ask("What is in front of the robot?", max_new_tokens=5, temperature=0.8, top_p=0.9)
    assert s.stats()["cache"]["evictions"] > 0
    s.reset()
    st = s.stats()
    assert (st["tokens_seen"], st["tokens_stored"], st["next_position"], st["frames_seen"]) == (0, 0, 0, 0)
    assert getattr(model.model, "rope_deltas", None) is None

    fresh = make_session(model, proc, cfg)
    outs = []
    for x in (s, fresh):
        x.observe(frame(1), 0.0)
        x.observe(frame(2), 0.5)
        outs.append(x.ask("Describe the image.", max_new_tokens=4, output_logits=True, temperature=0.7))
    a, b = outs
    assert a.tokens == b.tokens  # sampling generator reseeded too
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    assert a.cache == b.cache

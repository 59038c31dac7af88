"""Issue 12 item 4 end to end: a Qwen2-VL session fed wide and tall frames (each image token spans the whole h or
w extent of its frame) on a small budget. The span squeeze alone would leave more positions than the budget, so the
cache falls back to squeezing each M-RoPE row; next_position stays <= budget after every frame and <= budget +
max_chunk + max_new_tokens at every forward, answers stay finite."""

import torch
from engine_helpers import frame, make_session

from infmllm_ros.cache import CacheConfig

FRAMES = 120


def test_wide_and_tall_frames_keep_qwen2_vl_positions_bounded(tiny):
    model, proc = tiny("qwen2_vl")
    cfg = CacheConfig(policy="saddle", budget=24, recent=4, window=0, sinks=2, bias="none", max_chunk=64,
                      max_new_tokens=4)  # fmt: skip
    s = make_session(model, proc, cfg, frame_max_side=256, frame_min_side=16)  # frames kept at their shape
    cache = s.cache
    bound = cache.config.budget + cache.config.max_chunk + cache.config.max_new_tokens
    worst, spans = [], []
    begin = cache.begin_forward

    def checked(pos, prefill=True):
        rows = cache._rows(pos)
        spans.append(int((rows.max(0).values - rows.min(0).values).max()))  # the widest token of the forward
        begin(pos, prefill=prefill)
        worst.append(cache.next_position)

    cache.begin_forward = checked
    shapes = [(16, 256), (256, 16), (16, 192), (32, 32)]  # 1 x 16, 16 x 1, 1 x 12 merged tokens, then 2 x 2
    for i in range(FRAMES):
        h, w = shapes[i % len(shapes)]
        s.observe(frame(i, h, w), i * 0.1)
        assert cache.next_position <= cache.config.budget  # every frame evicts: the proven step
        if i % 40 == 39:
            a = s.ask("What is there?", max_new_tokens=3, output_logits=True)
            assert torch.isfinite(a.logits).all()
    assert max(worst) <= bound, (max(worst), bound)
    assert max(spans) == 15  # a 16 x 256 frame: 1 x 16 merged tokens, the last spans 16 positions of the w row
    assert cache.evictions >= FRAMES - 2 and cache.row_squeezes >= FRAMES // 10, cache.row_squeezes

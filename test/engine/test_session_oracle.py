"""Oracle: streaming through the session with a budget >= the whole stream == one full forward of the model over
the same token sequence (built here from the processor, all images at once per segment), greedy, fp32."""

import pytest
import torch
from engine_helpers import frame, make_session

from infmllm_ros.cache import CacheConfig
from infmllm_ros.engine.frames import fit
from infmllm_ros.engine.tiny import tiny_model

ATOL = 1e-5


def merge_pixels(family, parts):
    """Pixel kwargs of several processor calls -> one forward's kwargs, in image order."""
    out = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        if k == "batch_num_images":
            continue  # None = every image single-image anyres, as the session encodes each frame alone
        elif family in ("idefics3", "smolvlm"):  # (1, n_images, ...) per call
            out[k] = torch.cat(vals, 1)
        else:  # anyres: pad the patch axis like the processor does for a batch of images
            if vals[0].dim() == 5:
                n = max(v.shape[1] for v in vals)
                vals = [torch.nn.functional.pad(v, (0, 0, 0, 0, 0, 0, 0, n - v.shape[1])) for v in vals]
            out[k] = torch.cat(vals, 0)
    return out


def encode_segment(proc, text, images):
    out = proc(text=[text], images=images, return_tensors="pt", add_special_tokens=False,
               **({"do_image_splitting": False} if "Idefics3" in type(proc).__name__ or "SmolVLM" in
                  type(proc).__name__ else {}))
    pix = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    return out["input_ids"][0].tolist(), out.get("mm_token_type_ids"), pix


def full_forward(family, model, ids, pix, mm=None):
    ids_t = torch.tensor([ids])
    kw = dict(pix)
    if family.startswith("qwen2"):  # positions of the whole sequence, all image grids
        kw["position_ids"], _ = model.model.get_rope_index(ids_t, mm_token_type_ids=mm,
                                                           image_grid_thw=pix["image_grid_thw"])
    with torch.no_grad():
        return model(input_ids=ids_t, **kw).logits[0].float()


def test_stream_equals_full_forward(tiny, family):
    """Every tiny family (the `family` fixture)."""
    cfg = CacheConfig(policy="saddle", budget=1024, recent=64, window=16, max_chunk=256, max_new_tokens=8)
    _check_against_full_forward(tiny, family, cfg, "You are a robot.")


def test_qwen2_5_vl_stream_equals_full_forward(tiny):
    cfg = CacheConfig(policy="saddle", budget=1024, recent=64, window=16, max_chunk=256, max_new_tokens=8)
    _check_against_full_forward(tiny, "qwen2_5_vl", cfg, "You are a robot.")


@pytest.mark.parametrize("fam", ["llava_llama", "qwen2_vl"])
def test_small_chunks_still_equal_full_forward(tiny, fam):
    """max_chunk just above one frame: the system turn and answer closings are fed ahead of the next chunk (a forward
    without eviction, see test_session_votes), and the logits still equal the full forward."""
    system = "You are a robot assistant watching a camera stream."
    frame_tokens = {"llava_llama": 30, "qwen2_vl": 20}[fam]
    cfg = CacheConfig(policy="saddle", budget=1024, recent=64, window=16, max_chunk=frame_tokens + 2,
                      max_new_tokens=8)
    s, forwards = _check_against_full_forward(tiny, fam, cfg, system)
    assert forwards[0] == len(s._prefix_ids)  # the system turn went alone: it and a frame exceed max_chunk


def _check_against_full_forward(tiny, family, cfg, system):
    model, proc = tiny(family)
    s = make_session(model, proc, cfg, trace=True, system_prompt=system)
    forwards = []
    begin = s.cache.begin_forward
    s.cache.begin_forward = lambda pos, prefill=True: (forwards.append(pos.shape[-1]), begin(pos, prefill=prefill))[1]
    a = s.adapter
    imgs = [frame(1), frame(2), frame(3, 32, 48)]
    s.observe(imgs[0], 0.0)
    s.observe(imgs[1], 0.5)
    a1 = s.ask("What is in front of the robot?", max_new_tokens=6, output_logits=True)
    s.observe(imgs[2], 1.25)
    a2 = s.ask("Move forward and turn left.", max_new_tokens=5, output_logits=True)
    assert len(a1.tokens) == 6 and len(a2.tokens) == 5 and a2.frame_stamp == 1.25

    qo, qc = a.question_wrap()
    pil = [fit(i, s.frame_min_side, s.frame_max_side) for i in imgs]  # the documented pre-resize
    t1 = a.prefix_text(system) + a.frame_text(0.0) + a.frame_text(0.5) + qo + \
        "What is in front of the robot?" + qc
    t2 = a.close_text() + a.frame_text(1.25) + qo + "Move forward and turn left." + qc
    ids1, mm1, pix1 = encode_segment(proc, t1, pil[:2])
    ids2, mm2, pix2 = encode_segment(proc, t2, pil[2:])
    ids = ids1 + a1.tokens + ids2 + a2.tokens
    assert s.fed_ids == ids[:-1]  # the session fed exactly this sequence (the last token waits for the next chunk)
    assert max(forwards) <= cfg.max_chunk

    oracle_model, _ = tiny_model(family, seed=0)  # fresh copy: default attention, no cache
    mm = None
    if mm1 is not None:
        z = torch.zeros(1, len(a1.tokens), dtype=mm1.dtype)
        mm = torch.cat([mm1, z, mm2, torch.zeros(1, len(a2.tokens), dtype=mm1.dtype)], 1)
    full = full_forward(family, oracle_model, ids, merge_pixels(family, [pix1, pix2]), mm)
    o1 = full[len(ids1) - 1: len(ids1) - 1 + len(a1.tokens)]
    start2 = len(ids1) + len(a1.tokens) + len(ids2) - 1
    o2 = full[start2: start2 + len(a2.tokens)]
    torch.testing.assert_close(a1.logits, o1, atol=ATOL, rtol=0)
    torch.testing.assert_close(a2.logits, o2, atol=ATOL, rtol=0)
    special = torch.tensor(proc.tokenizer.all_special_ids)
    for o, ans in ((o1, a1), (o2, a2)):
        masked = o.clone()
        masked[:, special] = float("-inf")
        assert masked.argmax(-1).tolist() == ans.tokens
    return s, forwards


@pytest.mark.parametrize("fam", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_vl_later_image_gets_mrope_positions(tiny, fam):
    """A new image in a later chunk: the session's explicit (3, 1, q) positions == get_rope_index over the whole
    sequence with all image grids (absolute positions mode, nothing evicted)."""
    model, proc = tiny(fam)
    cfg = CacheConfig(policy="full", budget=1024, recent=0, positions="absolute", max_chunk=256, max_new_tokens=8)
    s = make_session(model, proc, cfg, trace=True)
    seen = []
    begin = s.cache.begin_forward
    s.cache.begin_forward = lambda pos, prefill=True: (seen.append(pos.clone()), begin(pos, prefill=prefill))[1]
    s.observe(frame(1, 32, 32), 0.0)
    s.ask("Describe the image.", max_new_tokens=3)
    s.observe(frame(2, 48, 64), 1.0)  # a later image with a different grid
    s.observe(frame(3, 64, 32), 2.0)
    s.ask("What changed?", max_new_tokens=2)
    got = torch.cat([p.reshape(3, -1) for p in seen], 1)
    ids = torch.tensor([s.fed_ids])
    image_id = model.config.image_token_id
    mm = (ids == image_id).long()
    grids = []
    for img in (frame(1, 32, 32), frame(2, 48, 64), frame(3, 64, 32)):
        from PIL import Image
        grids.append(proc.image_processor(images=[Image.fromarray(img)], return_tensors="pt")["image_grid_thw"])
    want, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=torch.cat(grids))
    assert int(mm.sum()) == int(sum(g.prod() // 4 for g in grids))
    assert got.shape == want[:, 0].shape
    assert torch.equal(got, want[:, 0])
    # the 3 rows really differ inside image blocks (else this test could not catch a 1-D fallback)
    assert not torch.equal(got[0], got[1])


@pytest.mark.parametrize("policy", ["saddle", "streaming_llm"])
def test_no_eviction_below_budget(tiny, policy):
    model, proc = tiny("llava_llama")
    cfg = CacheConfig(policy=policy, budget=512, recent=32, sinks=4, max_chunk=128, max_new_tokens=8)
    s = make_session(model, proc, cfg)
    for i in range(3):
        s.observe(frame(i), i)
    st = s.stats()
    assert st["tokens_seen"] == st["tokens_stored"] == st["next_position"]

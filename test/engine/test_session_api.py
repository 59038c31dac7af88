"""ask() options (sampling, top-p, stop strings, EOS, allowed_tokens_fn, streaming pieces), memory refusal,
from_pretrained, stats."""

import pytest
import torch
from engine_helpers import frame, make_session

from infmllm_ros.cache import CacheConfig
from infmllm_ros.engine import Answer, InsufficientMemoryError, StreamingSession
from infmllm_ros.engine.tiny import tiny_dir

CFG = CacheConfig(policy="saddle", budget=256, recent=32, window=16, max_chunk=128, max_new_tokens=12)


def _session(tiny, fam="qwen2_vl", **kw):
    model, proc = tiny(fam)
    s = make_session(model, proc, CFG, trace=True, **kw)
    s.observe(frame(1), 0.0)
    return s


def _forced(seq):
    return lambda generated: [seq[len(generated)]] if len(generated) < len(seq) else [seq[-1]]


def test_sampling_seeded_and_top_p(tiny):
    outs = []
    for seed in (3, 3, 4):
        s = _session(tiny)
        outs.append(s.ask("Describe the image.", max_new_tokens=8, temperature=1.0, seed=seed).tokens)
    assert outs[0] == outs[1] and outs[0] != outs[2]
    greedy = _session(tiny).ask("Describe the image.", max_new_tokens=8).tokens
    nucleus = _session(tiny).ask("Describe the image.", max_new_tokens=8, temperature=1.0, top_p=1e-6).tokens
    assert nucleus == greedy


def test_stop_string_and_streamed_pieces(tiny):
    s = _session(tiny)
    seq = s.tokenizer("Stop. Go back to the door.", add_special_tokens=False)["input_ids"]
    pieces = []
    a = s.ask("Go", max_new_tokens=12, stop=[". Go"], allowed_tokens_fn=_forced(seq), on_token=pieces.append)
    assert isinstance(a, Answer) and a.finish_reason == "stop" and a.text == "Stop"
    assert "".join(pieces) == a.text  # nothing of the stop string leaked into the stream
    assert a.frame_stamp == 0.0 and a.latency_s > 0 and a.cache["seen"] == s.stats()["tokens_seen"]


def test_eos_ends_answer_and_turn_is_closed_once(tiny):
    model, proc = tiny("qwen2_vl")
    eos = proc.tokenizer.eos_token_id
    s = make_session(model, proc, CFG, trace=True,
                     suppress_tokens=[t for t in proc.tokenizer.all_special_ids if t != eos])
    s.observe(frame(1), 0.0)
    seq = s.tokenizer("Stop.", add_special_tokens=False)["input_ids"] + [eos]
    pieces = []
    a = s.ask("Go", max_new_tokens=12, allowed_tokens_fn=_forced(seq), on_token=pieces.append)
    assert a.finish_reason == "eos" and a.tokens == seq and a.text == "Stop." and "".join(pieces) == "Stop."
    s.observe(frame(2), 1.0)
    fed = s.fed_ids
    i = len(fed) - fed[::-1].index(seq[0]) - 1  # the answer inside the conversation
    close = s.adapter.encode(s.adapter.close_text())
    assert fed[i: i + len(seq)] == seq and fed[i + len(seq) - 1: i + len(seq) - 1 + len(close)] == close


def test_allowed_tokens_fn_masks(tiny):
    s = _session(tiny, "llava_llama")
    allowed = [40, 41, 42]
    a = s.ask("Go", max_new_tokens=6, allowed_tokens_fn=lambda gen: allowed, temperature=1.0)
    assert set(a.tokens) <= set(allowed)
    with pytest.raises(RuntimeError, match="masked"):
        s.ask("Go", max_new_tokens=2, allowed_tokens_fn=lambda gen: [s.adapter.image_token_id()])


def test_memory_refused_up_front(tiny):
    model, proc = tiny("llava_llama")
    huge = CacheConfig(policy="saddle", budget=10**11, recent=32, max_chunk=128, max_new_tokens=8)
    with pytest.raises(InsufficientMemoryError, match="KV cache"):
        StreamingSession(model, proc, cache=huge)
    with pytest.raises(InsufficientMemoryError, match="weights"):
        StreamingSession.from_pretrained(str(tiny_dir("llava_llama")), cache=huge)
    s = StreamingSession(model, proc, cache=CFG)
    buffers = 3 if s.cache.read_copy else 2  # K, V (+ on CPU the keys as attention reads them: BoundedCache.read_copy)
    assert s.kv_bytes == 2 * buffers * 2 * (CFG.capacity + s.answer_tail) * 16 * 4  # layers x buffers x kv_heads x
    # slots x head_dim x fp32; the slots: capacity + the answer's closing text (it may wait beside a full chunk)
    assert s.cache.read_copy  # on this CPU


def test_from_pretrained_local_dir(tiny):
    tiny("smolvlm")  # makes sure the dir exists
    s = StreamingSession.from_pretrained(str(tiny_dir("smolvlm")), cache=CFG, device="cpu", dtype=torch.float32,
                                         system_prompt="You are a robot.")
    assert type(s.model).__name__ == "SmolVLMForConditionalGeneration"
    s.observe(frame(3), 0.0)
    a = s.ask("Describe the image.", max_new_tokens=3, output_logits=True)
    assert len(a.tokens) == 3 and torch.isfinite(a.logits).all()
    st = s.stats()
    assert st["frames_seen"] == 1 and st["questions"] == 1 and st["last_frame_tokens"] > 0
    assert st["tokens_seen"] == st["last_frame_tokens"] + len(s._prefix_ids) + st["last_question_tokens"] + 2


def test_failed_forward_fails_closed_until_reset(tiny):
    model, proc = tiny("llava_qwen2")
    s = make_session(model, proc, CFG)
    s.observe(frame(1), 0.0)
    real = s.model.forward

    def boom(*a, **k):
        raise RuntimeError("simulated device error")

    s.model.forward = boom
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            s.observe(frame(2), 1.0)
    finally:
        s.model.forward = real
    with pytest.raises(RuntimeError, match="reset"):
        s.ask("Go")
    s.reset()
    s.observe(frame(2), 1.0)
    assert len(s.ask("Go", max_new_tokens=2).tokens) == 2


def test_callback_error_keeps_conversation_well_formed(tiny):
    """on_token raising mid-answer: the error reaches the caller, the tokens chosen so far stay in the
    conversation (unfed ones + the turn closing go in front of the next chunk), and the session goes on."""
    model, proc = tiny("qwen2_vl")
    s = make_session(model, proc, CFG, trace=True)
    s.observe(frame(1), 0.0)
    seq = s.tokenizer("Stop. Go back to the door.", add_special_tokens=False)["input_ids"]
    calls = []

    def on_token(piece):
        calls.append(piece)
        if len(calls) == 3:
            raise KeyError("subscriber went away")

    with pytest.raises(KeyError):
        s.ask("Go", max_new_tokens=12, allowed_tokens_fn=_forced(seq), on_token=on_token)
    s.observe(frame(2), 1.0)
    close = s.adapter.encode(s.adapter.close_text())
    fed = s.fed_ids

    def contains(seq_, sub):
        return any(seq_[k: k + len(sub)] == sub for k in range(len(seq_) - len(sub) + 1))

    assert len(calls) == 3  # ASCII: every token streams a piece
    assert contains(fed, seq[:3] + close) and not contains(fed, seq[:4])
    assert len(s.ask("Go", max_new_tokens=2).tokens) == 2

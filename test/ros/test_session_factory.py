"""The node's seams without DDS: session factory, cache parameters, embedded-model lookup, strict String CDR."""

from __future__ import annotations

import json
import struct
import types

import pytest

import infmllm_ros
from infmllm_ros.ros import session_factory as sf
from infmllm_ros.ros.node import PARAMS, decode_string_cdr


def test_cache_kwargs_from_node_parameters():
    from infmllm_ros.cache import CacheConfig

    p = dict(PARAMS)
    p.update({"cache.budget": 128, "cache.recent": 32, "cache.max_chunk": 256, "generation.max_new_tokens": 40,
              "actions.max_new_tokens": 90})  # 0 (auto) values are resolved by make_session from the model
    kw = sf.cache_config_kwargs(p)
    cfg = CacheConfig(**kw)
    assert cfg.budget == 128 and cfg.recent == 32 and cfg.policy == "saddle"
    assert cfg.max_new_tokens == 90  # the cache holds the longest answer the node asks for


def test_load_factory():
    assert sf.load_factory("") is sf.make_session
    assert sf.load_factory("json:dumps") is json.dumps
    for bad in ("nocolon", ":x", "json:", "json:__name__"):
        with pytest.raises((ValueError, AttributeError)):
            sf.load_factory(bad)


def test_make_session_refuses_empty_model_without_embedded(monkeypatch, tmp_path):
    monkeypatch.setattr(infmllm_ros, "__file__", str(tmp_path / "infmllm_ros" / "__init__.py"))
    with pytest.raises(ValueError, match="parameter 'model' is empty"):
        sf.make_session(dict(PARAMS))


def test_embedded_model_prefers_robot_vlm_and_skips_text_models(monkeypatch, tmp_path):
    pkg = tmp_path / "infmllm_ros"
    monkeypatch.setattr(infmllm_ros, "__file__", str(pkg / "__init__.py"))
    assert sf.embedded_model() == ""
    (pkg / "assets" / "kjv_lm").mkdir(parents=True)
    (pkg / "assets" / "kjv_lm" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert sf.embedded_model() == ""  # a text-only LM is not a VLM
    (pkg / "assets" / "other_vlm").mkdir()
    (pkg / "assets" / "other_vlm" / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    assert sf.embedded_model().endswith("other_vlm")
    (pkg / "assets" / "robot_vlm").mkdir()
    (pkg / "assets" / "robot_vlm" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert sf.embedded_model().endswith("robot_vlm")


def test_tokenizer_of():
    tok = object()
    assert sf.tokenizer_of(types.SimpleNamespace(tokenizer=tok)) is tok
    assert sf.tokenizer_of(types.SimpleNamespace(processor=types.SimpleNamespace(tokenizer=tok))) is tok
    assert sf.tokenizer_of(object()) is None


def test_torch_dtype():
    import torch

    assert sf.torch_dtype("auto", "cpu") is torch.float32 and sf.torch_dtype("auto", "cuda:0") is torch.bfloat16
    with pytest.raises(ValueError):
        sf.torch_dtype("int8", "cpu")


def cdr(payload: bytes, little=True, n=None) -> bytes:
    n = len(payload) + 1 if n is None else n
    return (b"\x00\x01" if little else b"\x00\x00") + b"\x00\x00" + struct.pack("<I" if little else ">I", n) + \
        payload + b"\x00"


def test_decode_string_cdr_strict():
    assert decode_string_cdr(cdr("héllo ✓".encode()), 100) == "héllo ✓"
    assert decode_string_cdr(cdr(b"big endian", little=False), 100) == "big endian"
    for raw, match in [(cdr(b"\xff\xfe"), "not valid UTF-8"), (cdr(b"\xed\xa0\x80"), "not valid UTF-8"),
                       (cdr(b"abc", n=99), "length field"), (cdr(b"", n=0), "length field"), (b"\x00\x01", "2 bytes"),
                       (b"\x01\x01\x00\x00\x01\x00\x00\x00\x00", "encapsulation"), (cdr(b"x" * 500), "too long")]:
        with pytest.raises(ValueError, match=match):
            decode_string_cdr(raw, 100)

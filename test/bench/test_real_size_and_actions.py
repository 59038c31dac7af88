"""Smoke tests of `infmllm-bench real-size` and `infmllm-bench actions` at the smallest settings: every method runs
and its numbers are consistent with what was fed (token counts from the processor, budgets), not timed."""

import json

import pytest

pytest.importorskip("transformers")


def test_real_size_smoke(tmp_path):
    from infmllm_ros.bench import real_size

    out = tmp_path / "real_size.json"
    assert real_size.main(["--shapes", "smolvlm_256m", "--frames", "2", "--text-layers", "1", "--vision-layers", "1",
                           "--new-tokens", "2", "--questions", "1", "--budget", "256", "--k-frames", "1",
                           "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    rows = {x["method"]: x for x in r["rows"]}
    assert set(rows) == set(real_size.METHODS), [x.get("error") for x in r["rows"]]
    assert r["bandwidth_gb_s"] > 0
    # 512x512 SmolVLM frame, splitting off: (512/16)^2 / 4^2 = 64 image tokens + the row/column wrapping
    model, proc = real_size.build("smolvlm_256m", 1, 1)
    assert proc.image_seq_len == 64
    for m in ("saddle", "streaming_llm"):
        row = rows[m]
        assert row["tokens_per_frame"] >= 64 and 0 < row["kept_tokens"] <= 256 + 512  # budget + one max_chunk
        assert 0 < row["vision_ms"] <= row["observe_ms"] and row["decode_over_limit"] > 0
    assert rows["saddle"]["profile"]["decode_step"] and rows["saddle"]["profile"]["evicting_observe"]
    # the plain DynamicCache keeps everything: 2 frames of >= 64 tokens + a question + 2 answer tokens
    assert rows["dynamic_cache"]["kept_tokens"] > 2 * 64
    assert rows["saddle"]["weight_bytes"] == sum(p.numel() * 4 for p in model.parameters())


def test_actions_bench_smoke(tmp_path):
    from infmllm_ros.bench import actions

    out = tmp_path / "actions.json"
    assert actions.main(["--vocabs", "32k", "--sampled", "2", "--lmfe-sampled", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(x["vocab_size"], x["backend"]) for x in rows] == [(32000, "xgrammar"), (32000, "lmfe")]
    from infmllm_ros.bench.big_vocab import build_big_tokenizer

    tok = build_big_tokenizer(32000)
    for x in rows:  # every token of each forced action was allowed (the bench raises otherwise), then eos
        assert [f["tokens"] for f in x["forced"]] == [len(tok.encode(a)) + 1 for a in actions.ACTIONS]
        assert x["sampled_actions"] + x["sampled_cut_off"] == (2 if x["backend"] == "xgrammar" else 1)

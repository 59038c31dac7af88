import json
import math

import numpy as np
import pytest
import torch

from infmllm_ros.bench import corpus, metrics, policies, text_ppl
from infmllm_ros.bench.policies import FULL_ABSOLUTE, REFERENCE


def tiny(path):
    model, tok = text_ppl.load_model(path, torch.device("cpu"), torch.float32)
    return model, tok


def stream(tok, toy_file, n):
    return text_ppl.stream_ids(tok, n, corpus.split(toy_file.read_bytes()).held_out + toy_file.read_bytes())


def test_results_have_every_policy_at_every_budget(results_dir):
    res = json.loads((results_dir / "text_ppl.json").read_text())
    assert res["kind"] == "text_ppl" and res["tokens"] == 2048 and res["budgets"] == [32, 64]
    assert res["skipped"] is None, res["skipped"]
    expected = {REFERENCE.name, FULL_ABSOLUTE.name} | {s.name for s in policies.bounded_policies()}
    for budget in res["budgets"]:
        rows = {r["policy"]: r for r in res["rows"] if r["budget"] == budget}
        assert set(rows) == expected
        for r in rows.values():
            assert math.isfinite(r["ppl"]) and r["ppl"] > 1.0
            assert math.isfinite(r["ratio_to_reference"]) and len(r["windows"]) == len(r["window_ratios"])
        assert rows[REFERENCE.name]["ratio_to_reference"] == 1.0
        assert rows[FULL_ABSOLUTE.name]["tokens"] == 1024
    assert res["machine"]["cores"] and res["commit"] and res["command"].startswith("infmllm-bench text")
    assert (results_dir / "text_ppl.png").stat().st_size > 0
    assert "Budget 64" in (results_dir / "text_ppl.md").read_text()


def test_default_sweep_covers_every_bias_form():
    from infmllm_ros.cache.config import BIASES

    forms = {policies.parse_saddle(s)[0] for s in policies.DEFAULT_SADDLE_SWEEP}
    assert set(BIASES) <= forms


def test_reference_equals_an_independent_forward_over_the_window(tiny_model_dir, toy_file):
    """Oracle: one step of the recompute reference = a plain forward over [<s>] + last B-1 tokens + the chunk."""
    model, tok = tiny(tiny_model_dir)
    ids = stream(tok, toy_file, 400)
    budget, chunk = 48, 16
    ref = text_ppl.reference_nll(model, ids, budget, chunk, has_start=True)
    assert ref.shape == (400,)
    s = 10 * chunk  # a chunk well past the budget: the window has slid
    window = [corpus.BOS_ID] + ids[s - budget + 1:s + chunk].tolist()
    assert len(window) == budget + chunk and ids[0].item() == corpus.BOS_ID
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([window])).logits[0].double(), -1)
    targets = ids[s + 1:s + chunk + 1]
    oracle = np.array([-logp[budget + i, targets[i]].item() for i in range(chunk)])
    np.testing.assert_allclose(ref[s:s + chunk], oracle, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["window_no_sinks", "streaming_llm", "h2o", "saddle[linear,1]"])
def test_without_eviction_every_policy_equals_the_full_forward(tiny_model_dir, toy_file, name):
    """Budget >= stream: nothing is evicted, so the chunked stream scores exactly like one full forward."""
    model, tok = tiny(tiny_model_dir)
    ids = stream(tok, toy_file, 200)
    spec = next(s for s in policies.bounded_policies(("linear:1",)) if s.name == name)
    nll = text_ppl.policy_nll(model, ids, spec, 256, 32)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
    full = -logp[:-1].gather(-1, ids[1:, None])[:, 0].numpy()
    np.testing.assert_allclose(nll, full, rtol=0, atol=1e-4)
    np.testing.assert_allclose(text_ppl.reference_nll(model, ids, 256, 32, True), full, rtol=0, atol=1e-4)


def test_collapse_of_absolute_positions_is_detected_on_a_trained_model(trained, toy_file):
    """A model trained with context 64, streamed 2K tokens: the full cache with absolute positions collapses."""
    from transformers import AutoTokenizer

    _, model, path = trained
    ids = stream(AutoTokenizer.from_pretrained(path), toy_file, 2048)
    res = text_ppl.run(model, ids, [32], 32, ("linear:1",), log=lambda *a: None)
    rows = {r["policy"]: r for r in res["rows"]}
    assert rows[FULL_ABSOLUTE.name]["collapsed"], rows[FULL_ABSOLUTE.name]["window_ratios"]
    assert rows[FULL_ABSOLUTE.name]["flagged"]
    assert not rows["streaming_llm"]["collapsed"] and not rows[REFERENCE.name]["collapsed"]
    assert rows["streaming_llm"]["ratio_to_reference"] < 1.05


def test_detector_fires_on_runaway_and_not_on_a_hard_text():
    ref = [3.0, 3.1, 3.0, 3.2]
    assert metrics.detect_collapse([3.0, 9.0, 20.0, 40.0], ref)  # runs away from the reference
    assert metrics.detect_collapse([3.0, 3.2, 3.3, 6.5], ref)  # last window >= 2x the reference
    assert not metrics.detect_collapse([3.1, 3.2, 3.1, 3.3], ref)  # follows the reference
    assert not metrics.detect_collapse([3.0, 4.5, 5.5, 6.2], [3.0, 4.4, 5.4, 6.0])  # the text gets harder for both
    assert metrics.detect_collapse([3.0, 3.0, float("inf"), float("inf")], ref)
    with pytest.raises(ValueError):
        metrics.detect_collapse([1.0], [1.0, 2.0])


def test_flag_and_windows():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.5, 1.5, size=1000)
    worse = metrics.summarize("p", 64, ref + math.log(1.06), 100, ref)
    better = metrics.summarize("p", 64, ref + math.log(1.04), 100, ref)
    assert worse.flagged and not better.flagged
    assert worse.ratio_to_reference == pytest.approx(1.06) and len(worse.windows) == 10
    assert len(metrics.window_ppl(np.zeros(250), 100)) == 2  # the short tail merges into the last window
    assert metrics.ppl(np.zeros(5)) == 1.0


def test_another_hf_family_without_a_start_token(tmp_path, toy_file):
    """`--model` with any HF causal LM: a tiny random Qwen2 whose tokenizer has no BOS (no start token anywhere)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "qwen")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    out = tmp_path / "out"
    assert text_ppl.main(["--model", str(tmp_path / "qwen"), "--text", str(toy_file), "--tokens", "512",
                          "--budgets", "64", "--chunk", "32", "--saddle", "linear:1", "--threads", "1",
                          "--out", str(out)]) == 0
    res = json.loads((out / "text_ppl.json").read_text())
    assert res["start_token"] is None and res["model_info"]["class"] == "Qwen2ForCausalLM"
    rows = {r["policy"]: r for r in res["rows"]}
    assert set(rows) == {REFERENCE.name, FULL_ABSOLUTE.name, "window_no_sinks", "streaming_llm", "h2o",
                         "saddle[linear,1]"}
    assert all(math.isfinite(r["ppl"]) for r in rows.values())
    ids = torch.arange(100) % 256
    window = text_ppl.reference_window(ids, 80, 96, 64, has_start=False)
    assert window.tolist() == ids[16:96].tolist()  # no start token: just the last 64 tokens + the chunk

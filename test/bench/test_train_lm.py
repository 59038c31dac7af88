import json

import numpy as np
import torch

from infmllm_ros.bench import corpus, train_lm
from infmllm_ros.bench.cli import main as cli_main


def test_loss_falls_in_a_20_second_run(tmp_path, toy_file):
    out, save = tmp_path / "out", tmp_path / "ckpt"
    rc = cli_main(["train-lm", "--minutes", "0.3", "--text", str(toy_file), "--layers", "2", "--hidden", "64",
                   "--heads", "2", "--intermediate", "128", "--context", "64", "--warmup-steps", "10",
                   "--threads", "1", "--eval-every-s", "5", "--eval-chunks", "16", "--save", str(save),
                   "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "train_lm.json").read_text())
    assert 17 <= res["train_seconds"] <= 30 and res["steps"] > 20
    # ln(257) = 5.55 nats at the start; even a heavily loaded machine gets it 1.5 nats lower in 20 s
    assert res["final_train_loss"] < res["start_loss"] - 1.5, res["history"]
    assert res["final_held_loss"] < res["history"][0]["held_loss"] - 1.5
    assert res["kind"] == "train_lm" and res["machine"]["cores"] and res["command"].startswith("infmllm-bench train-lm")
    assert (out / "train_lm.png").stat().st_size > 0 and "| step |" in (out / "train_lm.md").read_text()
    saved = {p.name for p in save.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_log.json"} <= saved


def test_fixed_step_run_stops_at_max_steps(trained):
    result, _, _ = trained
    assert result["steps"] == 250
    assert result["final_train_loss"] < 0.4 * result["start_loss"], result["history"]


def test_checkpoint_reloads_to_identical_logits(trained):
    from transformers import AutoModelForCausalLM

    _, model, path = trained
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert next(AutoModelForCausalLM.from_pretrained(path).parameters()).dtype == torch.float16  # stored fp16
    x = torch.tensor([[corpus.BOS_ID] + list(b"And the lord said unto moses, let my people go.")])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, reloaded(input_ids=x).logits)


def test_tokenizer_is_byte_level_and_loads_offline(trained):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained[2])
    text = "Ge1:1 In the beginning \u00e9\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode())
    assert tok.bos_token_id == corpus.BOS_ID
    assert tok.decode(ids) == text


def test_default_model_fits_the_size_limit():
    from transformers import LlamaForCausalLM

    cfg = train_lm.model_config(train_lm.TrainConfig())
    n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert cfg.max_position_embeddings == 256 and cfg.vocab_size == corpus.VOCAB_SIZE
    assert 2 * n < 10 * 2**20  # fp16 safetensors under 10 MB


def test_split_holds_out_the_contiguous_tail():
    data = bytes(range(256)) * 40
    parts = corpus.split(data)
    assert parts.train + parts.held_out == data
    assert len(parts.held_out) == len(data) - int(len(data) * 0.9)
    assert np.array_equal(corpus.byte_ids(b"AB"), [65, 66])


def test_batches_start_with_the_start_token():
    data = np.arange(1000) % 256
    batch = train_lm.batch_at(data, np.array([0, 100]), 16)
    assert batch.shape == (2, 16) and (batch[:, 0] == corpus.BOS_ID).all()
    assert batch[1, 1:].tolist() == list(range(100, 115))

"""Shared fixtures of the benchmark tests: a toy text, a tiny random Llama, a briefly trained byte model."""

import random

import pytest
import torch

from infmllm_ros.bench import corpus, train_lm

WORDS = ("and the lord said unto moses let my people go that they may serve me in the wilderness "
         "of sin between elim and sinai on the fifteenth day of the second month").split()


def toy_text(seed: int = 0, verses: int = 1400) -> bytes:
    """A deterministic verse-shaped text (~90 KB): learnable in seconds, long enough for a 2K-token stream."""
    rng = random.Random(seed)
    lines = [f"Ex{1 + v // 30}:{1 + v % 30} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))) + "."
             for v in range(verses)]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="session")
def toy_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "toy.txt"
    path.write_bytes(toy_text())
    return path


def tiny_config(max_positions: int = 64):
    return train_lm.model_config(train_lm.TrainConfig(layers=2, hidden=64, heads=4, intermediate=128,
                                                      context=max_positions))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM (GQA: 4 query heads, 2 KV heads) with the byte tokenizer, saved fp32."""
    from transformers import LlamaForCausalLM

    cfg = tiny_config()
    cfg.num_key_value_heads = 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    corpus.byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory, toy_file):
    """A tiny model (trained context 64) trained for a fixed 250 steps on 1 thread, so the same whatever the
    load of the machine (10-20 s): (result, model, path)."""
    cfg = train_lm.TrainConfig(minutes=2.0, max_steps=250, threads=1, layers=2, hidden=64, heads=2, intermediate=128,
                               context=64, warmup_steps=10, eval_every_s=5.0, eval_chunks=16)
    path = tmp_path_factory.mktemp("kjv_lm_toy")
    result, model = train_lm.train(cfg, toy_file.read_bytes(), path, log=lambda *a: None)
    return result, model, path


@pytest.fixture(scope="session")
def results_dir(tmp_path_factory, tiny_model_dir, toy_file):
    """`infmllm-bench text` and `cost` on the tiny random Llama (2K-token stream): their results folder."""
    from infmllm_ros.bench.cli import main

    out = tmp_path_factory.mktemp("bench_out")
    assert main(["text", "--model", str(tiny_model_dir), "--text", str(toy_file), "--tokens", "2048",
                 "--budgets", "32", "64", "--chunk", "32", "--full-tokens", "1024", "--threads", "1",
                 "--out", str(out)]) == 0
    assert main(["cost", "--model", str(tiny_model_dir), "--lengths", "256", "512", "--full-max", "256",
                 "--budget", "64", "--chunk", "32", "--in-process", "--threads", "1", "--out", str(out)]) == 0
    return out

"""infmllm-bench train-lm: train the in-house byte-level Llama on the KJV text, time-boxed, CPU-friendly.

A LlamaForCausalLM (RoPE, RMSNorm, SwiGLU, tied embeddings) over bytes + a start token `<s>` that begins every
training sequence (without it no attention sink forms: see the team's tiny-LM experiment). AdamW, linear warm-up
then cosine decay on the wall-clock fraction, random windows of the first 90 % of the text. Saved in fp16 with
save_pretrained (safetensors) next to a byte-level tokenizer, so `AutoModelForCausalLM.from_pretrained(path)` and
`AutoTokenizer.from_pretrained(path)` load it offline.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from infmllm_ros.bench import common, corpus


@dataclass
class TrainConfig:
    minutes: float = 30.0
    max_steps: int = 0  # 0 = until the time is up; else stop after this many steps (whichever comes first)
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    intermediate: int = 688
    context: int = 256  # trained context, start token included
    batch: int = 8
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    rope_theta: float = 10000.0
    seed: int = 0
    threads: int = 2
    train_bytes: int = 0  # 0 = the whole training split; else only its first N bytes (quick runs, tests)
    eval_every_s: float = 60.0
    eval_chunks: int = 32


def model_config(cfg: TrainConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=corpus.VOCAB_SIZE, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.context, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True, bos_token_id=corpus.BOS_ID, eos_token_id=None, pad_token_id=None,
    )


def batch_at(data: np.ndarray, starts: np.ndarray, context: int) -> torch.Tensor:
    """[<s>] + (context - 1) bytes from each start offset."""
    rows = np.stack([data[s:s + context - 1] for s in starts])
    bos = np.full((len(starts), 1), corpus.BOS_ID, dtype=np.int64)
    return torch.from_numpy(np.concatenate([bos, rows], axis=1))


def random_starts(rng: np.random.Generator, n_bytes: int, context: int, count: int) -> np.ndarray:
    return rng.integers(0, n_bytes - context, size=count)


@torch.no_grad()
def mean_loss(model, batch: torch.Tensor, micro: int = 8) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(batch), micro):
        part = batch[i:i + micro]
        total += model(input_ids=part, labels=part).loss.item() * len(part)
        n += len(part)
    model.train()
    return total / n


def lr_at(cfg: TrainConfig, step: int, frac: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, frac)))


def optimizer(model, cfg: TrainConfig):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def train(cfg: TrainConfig, text: bytes, out_dir: Path, log=print):
    """Trains for cfg.minutes of wall clock, saves the fp16 checkpoint + tokenizer in out_dir.

    Returns (log dict, the model in fp32 holding exactly the saved fp16 weights)."""
    from transformers import LlamaForCausalLM

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    parts = corpus.split(text)
    train_ids = corpus.byte_ids(parts.train[:cfg.train_bytes] if cfg.train_bytes else parts.train)
    held_ids = corpus.byte_ids(parts.held_out)
    if len(train_ids) < 4 * cfg.context or len(held_ids) < 2 * cfg.context:
        raise ValueError(f"text too short for context {cfg.context}: "
                         f"{len(train_ids)} train / {len(held_ids)} held-out bytes")
    eval_rng = np.random.default_rng(1234)
    train_eval = batch_at(train_ids, random_starts(eval_rng, len(train_ids), cfg.context, cfg.eval_chunks), cfg.context)
    held_eval = batch_at(held_ids, random_starts(eval_rng, len(held_ids), cfg.context, cfg.eval_chunks), cfg.context)

    model = LlamaForCausalLM(model_config(cfg))
    model.train()
    opt = optimizer(model, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    history = [{"step": 0, "seconds": 0.0, "train_loss": mean_loss(model, train_eval),
                "held_loss": mean_loss(model, held_eval)}]
    log(f"train-lm: {n_params / 1e6:.2f}M parameters, {len(train_ids)} train bytes, {cfg.minutes} min budget, "
        f"start loss {history[0]['train_loss']:.3f}")
    budget_s = cfg.minutes * 60.0
    t0 = time.perf_counter()
    next_eval, step, ema = cfg.eval_every_s, 0, None
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s or (cfg.max_steps and step >= cfg.max_steps):
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, elapsed / budget_s)
        batch = batch_at(train_ids, random_starts(rng, len(train_ids), cfg.context, cfg.batch), cfg.context)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if time.perf_counter() - t0 >= next_eval:
            next_eval += cfg.eval_every_s
            history.append({"step": step, "seconds": round(time.perf_counter() - t0, 1), "train_ema": ema,
                            "held_loss": mean_loss(model, held_eval)})
            log(f"  step {step} {history[-1]['seconds']}s ema {ema:.3f} held {history[-1]['held_loss']:.3f}")
    train_s = time.perf_counter() - t0

    with torch.no_grad():  # round the weights (not the RoPE buffer) to the fp16 that is saved
        for p in model.parameters():
            p.copy_(p.half().float())
    final = {"step": step, "seconds": round(train_s, 1), "train_ema": ema,
             "train_loss": mean_loss(model, train_eval), "held_loss": mean_loss(model, held_eval)}
    history.append(final)
    save(model, out_dir)
    result = {
        "config": asdict(cfg), "parameters": n_params, "steps": step, "train_seconds": round(train_s, 1),
        "tokens_seen": step * cfg.batch * cfg.context, "train_bytes": int(len(train_ids)),
        "held_out_bytes": int(len(held_ids)), "start_loss": history[0]["train_loss"],
        "final_train_loss": final["train_loss"], "final_held_loss": final["held_loss"],
        "held_bits_per_byte": final["held_loss"] / math.log(2), "history": history,
        "checkpoint": str(out_dir), "checkpoint_bytes": sum(p.stat().st_size for p in Path(out_dir).iterdir()),
    }
    (Path(out_dir) / "training_log.json").write_text(json.dumps(result, indent=1) + "\n")
    log(f"train-lm: {step} steps in {train_s:.0f}s, loss {history[0]['train_loss']:.3f} -> {final['train_loss']:.3f} "
        f"(held-out {final['held_loss']:.3f} nats/byte), saved {out_dir}")
    return result, model


def save(model, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).half().save_pretrained(out_dir, safe_serialization=True)
    corpus.byte_tokenizer().save_pretrained(out_dir)


def load(path, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def markdown(result: dict) -> str:
    c, machine, cmd = result["config"], result["machine"], result["command"]
    rows = [[h["step"], h["seconds"], h.get("train_loss", h.get("train_ema")), h["held_loss"]]
            for h in result["history"]]
    return (f"### In-house language model (`train-lm`)\n\n"
            f"LlamaForCausalLM, {c['layers']} layers, hidden {c['hidden']}, {c['heads']} heads, "
            f"byte vocabulary + `<s>`, "
            f"trained context {c['context']}, {result['parameters'] / 1e6:.2f}M parameters; {result['steps']} steps "
            f"({result['tokens_seen'] / 1e6:.2f}M tokens) in {result['train_seconds']:.0f} s on "
            f"{common.describe_machine(machine)}.\n"
            f"Held-out loss {result['final_held_loss']:.3f} nats/byte "
            f"({result['held_bits_per_byte']:.3f} bits/byte).\n\n"
            f"`{cmd}`\n\n" + common.md_table(["step", "seconds", "train loss", "held-out loss"], rows))


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    h = result["history"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([x["seconds"] for x in h], [x["held_loss"] for x in h], marker="o", label="held-out")
    ax.plot([x["seconds"] for x in h], [x.get("train_loss", x.get("train_ema")) for x in h], marker=".", label="train")
    ax.set_xlabel("seconds")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title("train-lm")
    ax.legend()
    common.save_figure(fig, path)


def parse(argv):
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="infmllm-bench train-lm", description=__doc__.splitlines()[0])
    for field, value in asdict(d).items():
        p.add_argument("--" + field.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--text", default=None, help="train on this text file instead of the KJV dump")
    p.add_argument("--data-dir", default=str(corpus.DATA_DIR), help="where the KJV dump is cached")
    p.add_argument("--save", default=str(common.ASSET_MODEL), help="checkpoint folder (save_pretrained)")
    p.add_argument("--out", default=str(common.DEFAULT_OUT), help="results folder (JSON, markdown, PNG)")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    m = common.machine()
    common.print_machine(m)
    text = corpus.load_text(args.text, args.data_dir)
    result, _ = train(cfg, text, Path(args.save))
    result.update(kind="train_lm", machine=m, commit=common.git_commit(),
                  command=common.command_line(["train-lm", *argv]),
                  text=args.text or f"KJV (bible -f {corpus.KJV_RANGE})")
    paths = common.write_results(args.out, "train_lm", result, markdown(result))
    plot(result, Path(args.out) / "train_lm.png")
    print(f"wrote {paths['json']}")
    return 0

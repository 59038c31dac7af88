"""infmllm-bench train-vlm: train the embedded robot VLM (LLaVA: Llama text + CLIP vision) on the synthetic world.

A training sample is a stretch of a `world` stream fed exactly as `engine.StreamingSession` feeds it (its LLaVA
adapter's Vicuna turns, each piece tokenized alone): BOS, then per frame "USER: t=3.0s <image>\\n " (16 image tokens),
and after the frame a question is asked at, "USER: <question> ASSISTANT:" + "<answer></s>" + " ". The loss covers the
answer tokens and their </s> only, so the model learns to look back over the frames for past questions. The format
is saved as `stream_format.json` beside the weights.

Answers alone are a thin signal for the vision tower (a few tokens per frame), so training adds an auxiliary loss on
the projected image tokens: a linear head, dropped after training, predicts for each patch which object it shows
(colour + shape or background), that object's third of the image, near/far, whether it is the biggest in view, and
how many objects are in view, read off the world's pixel labels. The LLM then reads features that already carry
what the questions ask.

With `--ground-weight`, a second auxiliary loss grounds the questions' attention: for a current question and for
a past one that names an object, the attention mass of the question's last `EVIDENCE_QUERIES` queries, summed over
the heads of the later half of the layers (exactly what `EvidenceProbe` ranks frames by), should fall on the frames
the question is about (the newest; every frame showing the named object) rather than on the other frames.

    infmllm-bench train-vlm --minutes 45                      # -> infmllm_ros/assets/robot_vlm (fp16, ~4 MB)
    infmllm-bench train-vlm --eval-only infmllm_ros/assets/robot_vlm --eval-seeds 40
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from infmllm_ros import world
from infmllm_ros.bench.evidence import asked_object, shows
from infmllm_ros.engine.memory_view import EVIDENCE_QUERIES

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "robot_vlm"
EVAL_SEED_BASE = 0  # held-out episodes use seeds EVAL_SEED_BASE + k; training draws seeds >= TRAIN_SEED_BASE
TRAIN_SEED_BASE = 1_000_000
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{% if m['role'] == 'assistant' %}</s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@dataclass(frozen=True)
class Size:
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 6
    text_kv_heads: int = 2
    text_mlp: int = 512
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 256
    image_size: int = 64
    patch_size: int = 16  # -> (64/16)^2 = 16 image tokens per frame (CLS dropped)


SIZES = {
    "default": Size(),
    "tiny": Size(text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_mlp=128, vision_hidden=32,
                 vision_layers=1, vision_heads=2, vision_mlp=64),
}


@dataclass
class TrainConfig:
    minutes: float = 45.0
    size: str = "default"
    tokens_per_batch: int = 3000  # padded tokens per step; every stream in a step has the same number of frames
    max_batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    max_frames: int = 12  # frames per training stream: short_share of steps use 1..short_frames, the rest more
    short_frames: int = 3
    short_share: float = 0.5
    see_share: float = 0.25  # first part of the box: single-frame streams in small batches (learn to see first)
    see_batch: int = 24
    see_questions: int = 6  # questions after the one frame of a see-phase stream (dense answers per image)
    max_questions: int = 10
    aux_weight: float = 0.5  # weight of the auxiliary per-patch loss on the image tokens (0: off)
    ground_weight: float = 0.0  # weight of the grounding loss on the question's attention (0: off)
    seed: int = 0
    threads: int = 2
    max_steps: int | None = None
    log_every: int = 20
    init: str | None = None  # start from the weights of a saved model (same size and tokenizer) instead of fresh ones
    monitor_every: int = 0  # steps between held-out teacher-forced exact checks (0: none; a multiple of log_every)


# ----------------------------------------------------------------------------------------------- model + processor


def build_tokenizer(vocab_size: int = 1000):
    """Byte-level BPE trained on the world's questions, answers and stream markers; adds no BOS on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = world.vocabulary() * 4
    corpus += [f"USER: t={k / 2:.1f}s \n " for k in range(600)]
    corpus += [f"USER: {q} ASSISTANT:" for q in world.vocabulary()[:20]] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<image>"]
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return hf


def build(size: Size | str = "default", seed: int = 0):
    """(model fp32 train mode, processor) with fresh weights drawn from `seed`."""
    import transformers as tf

    size = SIZES[size] if isinstance(size, str) else size
    tok = build_tokenizer()
    text = tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=size.text_hidden, intermediate_size=size.text_mlp,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = tf.CLIPVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=size.vision_mlp, num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads, image_size=size.image_size, patch_size=size.patch_size)
    cfg = tf.LlavaConfig(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.LlavaForConditionalGeneration(cfg)
    improc = tf.CLIPImageProcessorPil(size={"shortest_edge": size.image_size},
                                      crop_size={"height": size.image_size, "width": size.image_size})
    proc = tf.LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=size.patch_size,
                             vision_feature_select_strategy="default", num_additional_image_tokens=1,
                             chat_template=CHAT_TEMPLATE)
    return model, proc


def image_tokens(model) -> int:
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2


def load(model_dir: str | os.PathLike, dtype=torch.float32):
    import transformers as tf

    model = tf.LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype).eval()
    proc = tf.LlavaProcessor.from_pretrained(str(model_dir))
    return model, proc


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Sample:
    ids: list[int]
    labels: list[int]  # -100 outside answers
    images: list[np.ndarray]
    spans: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, kind) of each answer + </s>
    patch_targets: list[np.ndarray] = field(default_factory=list)  # per image: (patches, len(AUX_HEADS)) int64
    # per grounded question: (its last EVIDENCE_QUERIES positions, image-token positions of every frame before it,
    # those of the frames it is about)
    ground: list[tuple[list[int], list[int], list[int]]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- auxiliary loss


AUX_NAMES = [f"{c} {s}" for c in world.COLOURS for s in world.SHAPES]
AUX_HEADS = {"what": len(AUX_NAMES) + 1, "where": len(world.POSITIONS), "near": 2, "biggest": 2,  # classes per head
             "count": len(world.NUMBERS)}
_WHAT, _WHERE, _NEAR, _BIGGEST, _COUNT = range(len(AUX_HEADS))  # column of each head in patch_targets
AUX_MIN_PX = 16  # an object covering fewer pixels of a patch leaves it to the background / larger object


def patch_targets(frame: world.Frame, patch: int) -> np.ndarray:
    """(patches in row-major order, len(AUX_HEADS)) int64 targets of the auxiliary heads from the frame's pixel
    labels; -100 where a head has no target (background patches have "what" = background and "count" only; "where"
    needs a clear third; "count", the objects in view, is on every patch unless a sliver makes it ambiguous)."""
    grid = frame.labels.shape[0] // patch
    out = np.full((grid * grid, len(AUX_HEADS)), -100, np.int64)
    sizes = [o.visible_px for o in frame.objects]
    biggest = int(np.argmax(sizes)) if sizes else -1
    if all(o.visible for o in frame.objects):
        out[:, _COUNT] = min(len(frame.objects), len(world.NUMBERS) - 1)
    for r in range(grid):
        for c in range(grid):
            block = frame.labels[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
            counts = np.bincount(block.ravel().astype(np.int64) + 1, minlength=len(frame.objects) + 1)[1:]
            row = out[r * grid + c]
            if len(counts) == 0 or counts.max() < AUX_MIN_PX:
                row[_WHAT] = len(AUX_NAMES)
                continue
            k = int(np.argmax(counts))
            o = frame.objects[k]
            row[_WHAT] = AUX_NAMES.index(o.name)
            if o.clear_position:
                row[_WHERE] = world.POSITIONS.index(o.position)
            row[_NEAR] = int(o.distance == "near")
            row[_BIGGEST] = int(k == biggest)
    return out


class AuxHead(torch.nn.Module):
    """Linear probes on the projected image tokens (the LLM's inputs); trained with the model, never saved."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, sum(AUX_HEADS.values()))

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.proj(features.reshape(-1, features.shape[-1]).float())
        parts = logits.split(list(AUX_HEADS.values()), dim=-1)
        targets = targets.reshape(-1, len(AUX_HEADS))
        losses = [torch.nn.functional.cross_entropy(x, targets[:, i], ignore_index=-100, reduction="sum")
                  / targets[:, i].ne(-100).sum().clamp(min=1) for i, x in enumerate(parts)]
        return torch.stack(losses).mean()


class Encoder:
    """Stream pieces -> ids exactly as the session feeds them (its LLaVA adapter's turns; checked in the tests).

    prefix (BOS) | per frame: "USER: t=3.0s <image>\\n " with <image> expanded as LlavaProcessor does |
    per question: "USER: " + question + " ASSISTANT:" | answer + </s> (the loss) | " " (the rest of the turn close).
    """

    def __init__(self, model, proc):
        from infmllm_ros.engine.adapters import adapter_for

        self.adapter = a = adapter_for(model, proc)
        self.tok = proc.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self.n = image_tokens(model)
        self.patch = model.config.vision_config.patch_size
        self.eos = self.tok.eos_token_id
        self.mean = np.asarray(proc.image_processor.image_mean, np.float32)
        self.std = np.asarray(proc.image_processor.image_std, np.float32)
        self.prefix = a.encode(a.prefix_text(None))
        open_, close_ = a.question_wrap()
        self.q_head, self.q_tail = a.encode(open_), a.encode(close_)
        close = a.encode(a.close_text())
        self.after_answer = close[1:] if close[:1] == [self.eos] else close
        self._cache: dict[object, list[int]] = {}

    def frame_ids(self, t: float) -> list[int]:
        key = ("frame", round(t, 1))
        if key not in self._cache:
            out = []
            for i in self.adapter.encode(self.adapter.frame_text(t)):
                out += [i] * self.n if i == self.image_id else [i]
            self._cache[key] = out
        return self._cache[key]

    def question_ids(self, question: str) -> list[int]:
        return self.q_head + self.adapter.encode_user(question) + self.q_tail

    def answer_ids(self, answer: str) -> list[int]:
        key = ("answer", answer)
        if key not in self._cache:
            self._cache[key] = self.adapter.encode_user(answer) + [self.eos]
        return self._cache[key]

    def pixels(self, rgb: np.ndarray) -> torch.Tensor:
        """CLIP normalisation of a 64x64 frame, equal to the image processor's output (no resize needed)."""
        x = (rgb.astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(x.transpose(2, 0, 1).copy())

    def sample(self, frames: list[world.Frame], events: list[world.Event], t_offset: float = 0.0,
               answers: bool = True) -> Sample:
        """The stream of `frames` with each event asked after its frame (answered when `answers`)."""
        by_frame = defaultdict(list)
        for e in events:
            by_frame[e.frame].append(e)
        ids, labels, images, spans, targets = list(self.prefix), [-100] * len(self.prefix), [], [], []
        ground, image_pos = [], []  # image_pos[k]: the image-token positions of frames[k]
        for k, f in enumerate(frames):
            piece = self.frame_ids(f.t + t_offset)
            image_pos.append([len(ids) + i for i, x in enumerate(piece) if x == self.image_id])
            ids += piece
            labels += [-100] * len(piece)
            images.append(f.rgb)
            if f.labels is not None:
                targets.append(patch_targets(f, self.patch))
            for e in by_frame[f.index]:
                piece = self.question_ids(e.question)
                about = grounding_frames(frames[:k + 1], e)
                if about:
                    q_end = len(ids) + len(piece)
                    ground.append((list(range(q_end - EVIDENCE_QUERIES, q_end)),
                                   [i for pos in image_pos for i in pos],
                                   [i for j in about for i in image_pos[j]]))
                ids += piece
                labels += [-100] * len(piece)
                if answers:
                    piece = self.answer_ids(e.answer)
                    spans.append((len(ids), len(ids) + len(piece), e.kind))
                    ids += piece + self.after_answer
                    labels += piece + [-100] * len(self.after_answer)
        return Sample(ids, labels, images, spans, targets if len(targets) == len(images) else [], ground)


def grounding_frames(frames: list[world.Frame], e: world.Event) -> list[int]:
    """Which of `frames` (the stream up to the question) a question is about, for the grounding loss: a current
    question, the newest; a past question that names an object, every frame showing it (what `infmllm-bench
    evidence` counts as a hit); others (actions), none. Only when some other frame is held: one frame grounds
    nothing."""
    if len(frames) < 2:
        return []
    if e.kind == "current":
        return [len(frames) - 1]
    if e.kind != "past":
        return []
    pred = asked_object(e.question)
    about = [k for k, f in enumerate(frames) if shows(f, pred)]
    return about if len(about) < len(frames) else []


def frames_for_step(rng: np.random.Generator, cfg: TrainConfig) -> int:
    if cfg.max_frames <= cfg.short_frames or rng.random() < cfg.short_share:
        return int(rng.integers(1, min(cfg.short_frames, cfg.max_frames) + 1))
    return int(rng.integers(cfg.short_frames + 1, cfg.max_frames + 1))


def training_sample(rng: np.random.Generator, enc: Encoder, cfg: TrainConfig, n: int) -> Sample:
    while True:
        seed = int(rng.integers(TRAIN_SEED_BASE, 2**31 - 1))
        questions = cfg.see_questions if n == 1 and cfg.see_questions else int(rng.integers(1, cfg.max_questions + 1))
        ep = world.make_episode(seed, n, questions)
        # the same question twice after one frame would let the second answer copy the first
        ep.events = list({(e.frame, e.question): e for e in reversed(ep.events)}.values())[::-1]
        if ep.events:
            last = max(e.frame for e in ep.events)
            offset = float(rng.integers(0, 240)) / 2 if rng.random() < 0.5 else 0.0  # stamps need not start at 0
            return enc.sample(ep.frames[:last + 1], ep.events, offset)


def collate(samples: list[Sample], enc: Encoder, pad_id: int, ground: bool = False) -> dict[str, torch.Tensor]:
    """A padded batch; with `ground`, also the grounded questions' rows for `grounding_loss` (key "ground")."""
    n = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), n), dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, :len(s.ids)] = torch.tensor(s.ids)
        labels[b, :len(s.ids)] = torch.tensor(s.labels)
        mask[b, :len(s.ids)] = 1
    pixels = torch.stack([enc.pixels(im) for s in samples for im in s.images])
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}
    if all(s.patch_targets for s in samples):
        out["patch_targets"] = torch.from_numpy(np.stack([t for s in samples for t in s.patch_targets]))
    rows = [(b, g) for b, s in enumerate(samples) for g in s.ground] if ground else []
    if rows:
        frame_mask, about_mask = torch.zeros(len(rows), n), torch.zeros(len(rows), n)
        for r, (_, (_, frames, about)) in enumerate(rows):
            frame_mask[r, frames] = 1.0
            about_mask[r, about] = 1.0
        out["ground"] = {"batch": torch.tensor([b for b, _ in rows]),
                         "queries": torch.tensor([g[0] for _, g in rows]), "frames": frame_mask, "about": about_mask}
    return out


def grounding_loss(attentions, ground: dict) -> torch.Tensor:
    """-log of the share of the frame attention that the question's last queries, summed over the heads and the
    later half of the layers (what `EvidenceProbe` reads), put on the frames the question is about."""
    b, q = ground["batch"][:, None], ground["queries"]
    mass = sum(a[b, :, q].float().sum(dim=(1, 2)) for a in attentions[len(attentions) // 2:])  # [rows, T]
    on_frames = (mass * ground["frames"]).sum(-1)
    on_about = (mass * ground["about"]).sum(-1)
    return (torch.log(on_frames + 1e-6) - torch.log(on_about + 1e-6)).mean()


# ----------------------------------------------------------------------------------------------- training


MONITOR_SEED_BASE = 500_000  # held out from training, apart from the evaluate() seeds


def monitor_samples(enc: Encoder, n: int = 48, n_frames: int = 6) -> list[Sample]:
    return [enc.sample(ep.frames, ep.events) for ep in
            (world.make_episode(MONITOR_SEED_BASE + k, n_frames, 4) for k in range(n)) if ep.events]


@torch.no_grad()
def teacher_forced_exact(model, enc: Encoder, samples: list[Sample], batch: int = 8) -> dict[str, float]:
    """Share of answers whose every token (and </s>) is the argmax given the true prefix, per kind. That is exactly
    the share greedy decoding gets right token for token, at the cost of one forward."""
    hits, counts = Counter(), Counter()
    was_training = model.training
    model.eval()
    for i in range(0, len(samples), batch):
        part = samples[i:i + batch]
        b = collate(part, enc, enc.tok.pad_token_id)
        b.pop("labels")
        b.pop("patch_targets", None)
        pred = model(**b).logits.argmax(-1)
        for row, s in enumerate(part):
            for start, end, kind in s.spans:
                ok = torch.equal(pred[row, start - 1:end - 1], b["input_ids"][row, start:end])
                hits[kind] += ok
                counts[kind] += 1
    model.train(was_training)
    return {k: round(hits[k] / counts[k], 3) for k in sorted(counts)}



def lr_at(frac: float, base: float) -> float:
    """Linear warm-up over the first 3% of the time box, cosine down to 10% after."""
    if frac < 0.03:
        return base * max(frac / 0.03, 0.05)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - 0.03) / 0.97))))


def train(cfg: TrainConfig, out: str | os.PathLike | None = None, log=print) -> dict:
    """Train for `cfg.minutes` (or `cfg.max_steps`); save fp16 model + processor into `out` when given."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, proc = build(cfg.size, cfg.seed)
    if cfg.init:
        saved, saved_proc = load(cfg.init)
        if saved_proc.tokenizer.get_vocab() != proc.tokenizer.get_vocab():
            raise ValueError(f"{cfg.init} has another tokenizer; cannot continue from it")
        model.load_state_dict({k: v.float() for k, v in saved.state_dict().items()})
    model.train()
    enc = Encoder(model, proc)
    rng = np.random.Generator(np.random.PCG64([cfg.seed, 7]))
    aux = AuxHead(model.config.text_config.hidden_size)
    features = {}
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda mod, inp, out: features.__setitem__("x", out))
    params = list(model.named_parameters()) + [("aux." + n, p) for n, p in aux.named_parameters()]
    decay = [p for n, p in params if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in params if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0}],
                            lr=cfg.lr, betas=(0.9, 0.98))
    box = cfg.minutes * 60.0
    monitor = monitor_samples(enc) if cfg.monitor_every else []
    t0 = time.monotonic()
    losses, aux_losses, ground_losses, history, step, tokens = [], [], [], [], 0, 0
    if cfg.ground_weight:
        model.set_attn_implementation("eager")  # the grounding loss reads the attention probabilities
    while True:
        elapsed = time.monotonic() - t0
        frac = elapsed / box if cfg.max_steps is None else step / cfg.max_steps if cfg.max_steps else 1.0
        if frac >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, cfg.lr)
        seeing = frac < cfg.see_share
        n, samples = (1 if seeing else frames_for_step(rng, cfg)), []
        while len(samples) < (cfg.see_batch if seeing else cfg.max_batch) and (len(samples) + 1) * max(
                [len(x.ids) for x in samples] + [0]) < cfg.tokens_per_batch:
            samples.append(training_sample(rng, enc, cfg, n))
        batch = collate(samples, enc, proc.tokenizer.pad_token_id, ground=bool(cfg.ground_weight))
        tokens += batch["input_ids"].numel()
        targets = batch.pop("patch_targets", None)
        ground = batch.pop("ground", None)
        grounding = bool(cfg.ground_weight and ground is not None)
        result = model(**batch, output_attentions=grounding)
        loss = result.loss
        lm_loss = loss.item()
        if cfg.aux_weight and targets is not None:
            aux_loss = aux(features["x"], targets)
            aux_losses.append(aux_loss.item())
            loss = loss + cfg.aux_weight * aux_loss
        if grounding:
            ground_loss = grounding_loss(result.attentions, ground)
            ground_losses.append(ground_loss.item())
            loss = loss + cfg.ground_weight * ground_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        losses.append(lm_loss)
        step += 1
        if step % cfg.log_every == 0:
            mean = float(np.mean(losses[-cfg.log_every:]))
            history.append({"step": step, "seconds": round(time.monotonic() - t0, 1), "loss": round(mean, 4),
                            "tokens": tokens})
            if aux_losses:
                history[-1]["aux_loss"] = round(float(np.mean(aux_losses[-cfg.log_every:])), 4)
            if ground_losses:
                history[-1]["ground_loss"] = round(float(np.mean(ground_losses[-cfg.log_every:])), 4)
            if cfg.monitor_every and step % cfg.monitor_every == 0:
                history[-1]["exact"] = teacher_forced_exact(model, enc, monitor)
            log(f"step {step:6d}  {history[-1]['seconds']:7.1f}s  loss {mean:.4f}  aux {history[-1].get('aux_loss')}"
                f"  ground {history[-1].get('ground_loss')}"
                f"  lr {opt.param_groups[0]['lr']:.2e}"
                f"  tokens {tokens}" + (f"  held-out exact {history[-1]['exact']}" if "exact" in history[-1] else ""))
    hook.remove()
    model.eval()
    if cfg.ground_weight:
        model.set_attn_implementation("sdpa")
    record = {"steps": step, "seconds": round(time.monotonic() - t0, 1), "first_loss": losses[0] if losses else None,
              "last_loss": float(np.mean(losses[-cfg.log_every:])) if losses else None, "history": history,
              "config": asdict(cfg), "size": asdict(SIZES[cfg.size]),
              "parameters": sum(p.numel() for p in model.parameters()), "image_tokens_per_frame": image_tokens(model),
              "torch_threads": torch.get_num_threads(), "cpu": os.cpu_count()}
    if out is not None:
        save(model, proc, out, record)
    return {"model": model, "processor": proc, **record}


def save(model, proc, out: str | os.PathLike, record: dict | None = None) -> Path:
    """fp16 save_pretrained of model + processor, plus stream_format.json and train_record.json; atomic rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    enc = Encoder(model, proc)
    copy.deepcopy(model).to(torch.float16).save_pretrained(tmp)  # the caller's model stays as it is
    proc.save_pretrained(tmp)
    (tmp / "stream_format.json").write_text(json.dumps({
        "frame": enc.adapter.frame_text(3.0), "question": enc.adapter.question_wrap(), "answer_close":
        enc.adapter.close_text(), "prefix": enc.adapter.prefix_text(None), "system_prompt": None,
        "image_tokens_per_frame": image_tokens(model), "fps": world.FPS, "actions": world.ACTIONS,
        "note": "chunks are tokenized alone with add_special_tokens=False; no BOS"}, indent=1) + "\n")
    if record is not None:
        (tmp / "train_record.json").write_text(json.dumps(record, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------- evaluation


def answer(model, proc, frames: list[world.Frame], question: str, enc: Encoder | None = None,
           max_new_tokens: int = 40) -> str:
    """Greedy answer after one full-context forward over the prefix, `frames` (each through the processor, as the
    session encodes a frame) and `question`."""
    from PIL import Image

    enc = enc or Encoder(model, proc)
    ids, pixels = [torch.tensor([enc.prefix])], []
    for f in frames:
        out = proc(text=[enc.adapter.frame_text(f.t)], images=[Image.fromarray(f.rgb)], return_tensors="pt",
                   add_special_tokens=False)
        ids.append(out["input_ids"])
        pixels.append(out["pixel_values"])
    ids = torch.cat(ids + [torch.tensor([enc.question_ids(question)])], 1)
    kwargs = {"pixel_values": torch.cat(pixels).to(model.dtype)} if pixels else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=enc.eos, pad_token_id=proc.tokenizer.pad_token_id, **kwargs)
    return proc.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _bucket(d: int | None) -> str:
    if d is None:
        return "none"
    return "0" if d == 0 else "1-2" if d <= 2 else "3-5" if d <= 5 else "6-10" if d <= 10 else "11+"


def evaluate(model_dir, seeds, kinds=world.KINDS, n_frames: int = 12, n_questions: int = 6, model=None,
             proc=None) -> dict:
    """Exact-match accuracy (after normalize_answer) per kind, per template and per distance bucket on the episodes
    `make_episode(seed, n_frames, n_questions, kinds=kinds)`; `majority` is the accuracy of always giving the most
    common answer of each template (the chance level to beat)."""
    if model is None:
        model, proc = load(model_dir)
    enc = Encoder(model, proc)
    events = []
    for seed in seeds:
        ep = world.make_episode(int(seed), n_frames, n_questions, kinds=tuple(kinds))
        for e in ep.events:
            got = answer(model, proc, ep.frames[:e.frame + 1], e.question, enc)
            events.append((e, got, world.normalize_answer(got) == world.normalize_answer(e.answer)))
    counts = defaultdict(Counter)
    for e, _, _ in events:
        counts[e.template][world.normalize_answer(e.answer)] += 1
    common = {tpl: c.most_common(1)[0][0] for tpl, c in counts.items()}

    def table(key):
        rows = defaultdict(lambda: [0, 0, 0])
        for e, _, ok in events:
            r = rows[key(e)]
            r[0] += 1
            r[1] += ok
            r[2] += world.normalize_answer(e.answer) == common[e.template]
        return {k: {"n": n, "accuracy": round(c / n, 3), "majority": round(m / n, 3)} for k, (n, c, m) in
                sorted(rows.items())}

    return {"kinds": table(lambda e: e.kind), "templates": table(lambda e: f"{e.kind}/{e.template}"),
            "distance": table(lambda e: f"{e.kind}/{_bucket(e.distance)}"), "n": len(events),
            "examples": [{"q": e.question, "truth": e.answer, "got": g} for e, g, _ in events[:12]]}


# ----------------------------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="infmllm-bench train-vlm", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=45.0, help="time box for training (default 45)")
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--tokens-per-batch", type=int, default=3000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-frames", type=int, default=12)
    p.add_argument("--init", metavar="MODEL_DIR", help="continue from a saved model's weights")
    p.add_argument("--see-share", type=float, default=0.25, help="share of the box on single frames first")
    p.add_argument("--see-questions", type=int, default=6, help="questions after the frame of a see-phase stream")
    p.add_argument("--max-questions", type=int, default=10, help="most questions in a multi-frame training stream")
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-patch auxiliary loss (0: off)")
    p.add_argument("--ground-weight", type=float, default=0.0,
                   help="weight of the loss that grounds a question's attention in the frames it is about (0: off)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps instead of the time box")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--monitor-every", type=int, default=100, help="steps between held-out exact-match checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output dir (default {DEFAULT_OUT})")
    p.add_argument("--eval-seeds", type=int, default=20, help="held-out episodes evaluated after training (0: none)")
    p.add_argument("--eval-frames", type=int, default=12, help="frames per held-out episode (training max: 12)")
    p.add_argument("--eval-only", metavar="MODEL_DIR", help="only evaluate a saved model")
    p.add_argument("--json", help="write the evaluation here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.eval_only:
        model_dir = a.eval_only
    else:
        cfg = TrainConfig(minutes=a.minutes, size=a.size, tokens_per_batch=a.tokens_per_batch, lr=a.lr,
                          max_frames=a.max_frames, log_every=a.log_every, see_share=a.see_share,
                          see_questions=a.see_questions, max_questions=a.max_questions, aux_weight=a.aux_weight,
                          ground_weight=a.ground_weight,
                          monitor_every=a.monitor_every, init=a.init,
                          seed=a.seed, threads=a.threads, max_steps=a.max_steps)
        res = train(cfg, a.out)
        model_dir = a.out
        print(f"trained {res['steps']} steps in {res['seconds']} s, loss {res['first_loss']} -> "
              f"{res['last_loss']}; {res['parameters']} parameters; saved to {model_dir}")
    if a.eval_seeds:
        t0 = time.monotonic()
        ev = evaluate(model_dir, range(EVAL_SEED_BASE, EVAL_SEED_BASE + a.eval_seeds), n_frames=a.eval_frames)
        print(f"evaluation on {a.eval_seeds} held-out episodes ({ev['n']} questions, {time.monotonic() - t0:.0f} s):")
        for name in ("kinds", "templates", "distance"):
            for k, r in ev[name].items():
                print(f"  {k:28s} n={r['n']:4d}  accuracy {r['accuracy']:.3f}  (majority {r['majority']:.3f})")
        if a.json:
            Path(a.json).write_text(json.dumps(ev, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Offline tiny models of the real VLM architectures, random weights, deterministic from a seed.

`tiny_model(family, seed)` builds a model + processor from configs (no hub), saves both into a directory and loads
them back through `loading.load`, the same code path the session uses for real checkpoints. Sizes follow the
verified recipes in shared/ENVIRONMENT.md section 3 (2 text layers, hidden 64, GQA 4/2, 32x32 vision tiles).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from infmllm_ros.engine import loading

FAMILIES = ("llava_llama", "llava_qwen2", "llava_onevision", "idefics3", "smolvlm", "qwen2_vl")
EXTRA_FAMILIES = ("qwen2_5_vl",)  # also buildable; kept out of FAMILIES so the per-family test matrix stays small
_VERSION = 2  # bump when a recipe changes, so stale cache dirs are not reused

CORPUS = ["Describe the image.", "What is in front of the robot?", "Move forward and turn left.",
          "There is a red cup on the table.", "Pick up the blue box and place it on the shelf.",
          "What changed since t=1.5s? Answer in one word.", "Stop. Go back to the door.",
          "You are a robot assistant watching a camera stream."] * 20

_LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{% if m['role'] == 'assistant' %}</s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _qwen_template(image: str) -> str:
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image +
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


_IDEFICS_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def build_tokenizer(special_tokens, vocab_size=400, bos="<s>", eos="</s>", pad="<pad>"):
    """Byte-level BPE trained on a fixed corpus. Adds no BOS on encode, so later chunks tokenize alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    base = [t for t in (pad, bos, eos) if t]
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=base + [t for t in special_tokens if t not in base],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    hf.add_special_tokens({"additional_special_tokens": [t for t in special_tokens if t not in base]})
    return hf


def _text_cfg(cls, tok, **extra):
    return cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)


_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
               patch_size=8)


def _llava(text: str):
    import transformers as tf

    if text == "llama":
        tok = build_tokenizer(["<image>"])
        text_cfg, vision_cfg = _text_cfg(tf.LlamaConfig, tok), tf.CLIPVisionConfig(**_VISION)
        improc = tf.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        strategy, extra, template = "default", 1, _LLAVA_TEMPLATE
    else:
        tok = build_tokenizer(["<image>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>")
        text_cfg, vision_cfg = _text_cfg(tf.Qwen2Config, tok), tf.SiglipVisionConfig(**_VISION)
        improc = tf.SiglipImageProcessorPil(size={"height": 32, "width": 32})
        strategy, extra, template = "full", 0, _qwen_template("<image>\n")
    cfg = tf.LlavaConfig(text_config=text_cfg, vision_config=vision_cfg,
                         image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy=strategy, vision_feature_layer=-1)
    model = tf.LlavaForConditionalGeneration(cfg)
    proc = tf.LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=8,
                             vision_feature_select_strategy=strategy, num_additional_image_tokens=extra,
                             chat_template=template)
    return model, proc


def _onevision():
    import transformers as tf

    from infmllm_ros.engine.processors import OnevisionImageOnlyProcessor

    tok = build_tokenizer(["<image>", "<video>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>")
    pin = [[32, 32], [32, 64], [64, 32], [64, 64]]
    cfg = tf.LlavaOnevisionConfig(
        vision_config=tf.SiglipVisionConfig(**_VISION), text_config=_text_cfg(tf.Qwen2Config, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pin, vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9")
    model = tf.LlavaOnevisionForConditionalGeneration(cfg)
    proc = OnevisionImageOnlyProcessor(
        image_processor=tf.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pin),
        tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=_qwen_template("<image>\n"))
    return model, proc


def _idefics(smol: bool):
    import transformers as tf

    from infmllm_ros.engine.processors import SmolVLMImageOnlyProcessor

    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<|im_start|>"] + \
        [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]  # all needed for splitting
    tok = build_tokenizer(specials, eos="<end_of_utterance>")
    cfg_cls, vis_cls, model_cls, improc_cls, proc_cls = (
        (tf.SmolVLMConfig, tf.SmolVLMVisionConfig, tf.SmolVLMForConditionalGeneration, tf.SmolVLMImageProcessorPil,
         SmolVLMImageOnlyProcessor) if smol else
        (tf.Idefics3Config, tf.Idefics3VisionConfig, tf.Idefics3ForConditionalGeneration,
         tf.Idefics3ImageProcessorPil, tf.Idefics3Processor))
    cfg = cfg_cls(vision_config=vis_cls(**_VISION), text_config=_text_cfg(tf.LlamaConfig, tok), scale_factor=2,
                  image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    model = model_cls(cfg)
    proc = proc_cls(image_processor=improc_cls(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                               do_image_splitting=True),
                    tokenizer=tok, image_seq_len=4, chat_template=_IDEFICS_TEMPLATE)  # (32/8)^2 / 2^2 = 4
    return model, proc


def _qwen2_vl(v25: bool = False):
    import transformers as tf

    from infmllm_ros.engine.processors import Qwen2_5_VLImageOnlyProcessor, Qwen2VLImageOnlyProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
    tok = build_tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=None,
                eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    if v25:  # window attention vision tower with a merger to the text width
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1])
    else:  # vision hidden_size == text hidden_size
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
    cfg_cls, model_cls, proc_cls = ((tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration,
                                     Qwen2_5_VLImageOnlyProcessor) if v25 else
                                    (tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, Qwen2VLImageOnlyProcessor))
    cfg = cfg_cls(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                  video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                  vision_end_token_id=ids("<|vision_end|>"))
    model = model_cls(cfg)
    proc = proc_cls(
        image_processor=tf.Qwen2VLImageProcessorPil(size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
                                                    patch_size=8, temporal_patch_size=2, merge_size=2),
        tokenizer=tok, chat_template=_qwen_template("<|vision_start|><|image_pad|><|vision_end|>"))
    return model, proc


_BUILDERS = {
    "llava_llama": lambda: _llava("llama"),
    "llava_qwen2": lambda: _llava("qwen2"),
    "llava_onevision": _onevision,
    "idefics3": lambda: _idefics(False),
    "smolvlm": lambda: _idefics(True),
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": lambda: _qwen2_vl(v25=True),
}


def build(family: str, seed: int = 0):
    """Build (model, processor) in memory, weights drawn from `seed` (fp32, eval mode)."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; choose from {FAMILIES + EXTRA_FAMILIES}")
    with torch.random.fork_rng(devices=[]):  # why: do not disturb the caller's global RNG
        torch.manual_seed(seed)
        model, proc = _BUILDERS[family]()
    return model.eval(), proc


def tiny_dir(family: str, seed: int = 0) -> Path:
    return Path(tempfile.gettempdir()) / "infmllm_ros_tiny" / f"{family}-seed{seed}-v{_VERSION}"


def save(family: str, seed: int, path: str | os.PathLike) -> Path:
    """Build and save model + processor into `path`, atomically (several processes may build the same dir)."""
    path = Path(path)
    model, proc = build(family, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    model.save_pretrained(tmp)
    proc.save_pretrained(tmp)
    (tmp / "TINY_OK").write_text(f"{family} {seed}\n")
    try:
        os.replace(tmp, path) if not path.exists() else shutil.rmtree(tmp)
    except OSError:  # lost a race with another process: theirs is complete (TINY_OK is written last)
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_model(family: str, seed: int = 0, path: str | os.PathLike | None = None):
    """(model, processor) for a tiny `family`, loaded from disk by the session's loading code. fp32, CPU, eval."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; choose from {FAMILIES + EXTRA_FAMILIES}")
    d = Path(path) if path is not None else tiny_dir(family, seed)
    if not (d / "TINY_OK").exists():
        if d.exists() and path is not None and any(d.iterdir()):
            raise FileExistsError(f"{d} exists and is not a tiny model dir")
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
        save(family, seed, d)
    return loading.load(str(d), device="cpu", dtype=torch.float32)

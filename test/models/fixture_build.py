"""Build a real-shape checkpoint dir from test/fixtures/<name>: the published config at its real widths (hidden size,
heads, KV heads, head_dim, vision tower, image processor), random weights, fewer layers, and a tokenizer stand-in.

What is reduced and why (none of it changes tokens per frame or KV bytes per token per layer):
  * text layers -> 2 and vision layers -> 1 (CI time); KV bytes scale with layers, so tests compare per layer;
  * text intermediate_size capped at 1024 (the MLP width is never observed; keeps the 7B shapes at ~0.6 GB);
  * vocab -> the stand-in tokenizer's size, and every special-token id (image, video, vision start/end, EOS) is
    remapped to the stand-in's id of the same token string, so ids in config.json and generation_config.json agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NAMES = ("SmolVLM-256M-Instruct", "SmolVLM2-2.2B-Instruct", "llava-onevision-qwen2-0.5b-ov-hf", "llava-1.5-7b-hf",
         "Qwen2-VL-2B-Instruct", "Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL-7B-Instruct")
TEXT_LAYERS, VISION_LAYERS, MAX_INTERMEDIATE = 2, 1, 1024

_IDEFICS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<|im_start|>",
            "<|im_end|>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
_QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
         "<|image_pad|>", "<|video_pad|>"]
# model_type -> (special tokens, bos, eos, pad, {published id: token string})
_TOKENS = {
    "idefics3": (_IDEFICS, "<|endoftext|>", "<end_of_utterance>", "<|im_end|>",
                 {49190: "<image>", 2: "<|im_end|>", 49279: "<end_of_utterance>", 1: "<|im_start|>"}),
    "llava_onevision": (["<image>", "<video>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>",
                        "<|endoftext|>", {151646: "<image>", 151647: "<video>", 151643: "<|endoftext|>",
                                          151645: "<|im_end|>"}),
    "llava": (["<image>"], "<s>", "</s>", "<pad>", {32000: "<image>", 1: "<s>", 2: "</s>", 32001: "<pad>"}),
    "qwen2_vl": (_QWEN, None, "<|im_end|>", "<|endoftext|>",
                 {151643: "<|endoftext|>", 151645: "<|im_end|>", 151652: "<|vision_start|>",
                  151653: "<|vision_end|>", 151654: "<|vision_pad|>", 151655: "<|image_pad|>",
                  151656: "<|video_pad|>"}),
}
_TOKENS["smolvlm"] = _TOKENS["idefics3"]
_TOKENS["qwen2_5_vl"] = _TOKENS["qwen2_vl"]
_ID_KEYS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index", "vision_start_token_id",
            "vision_end_token_id", "vision_token_id", "bos_token_id", "eos_token_id", "pad_token_id")
_IMAGE_PROCESSORS = {"idefics3": "Idefics3ImageProcessorPil", "smolvlm": "SmolVLMImageProcessorPil",
                     "llava_onevision": "LlavaOnevisionImageProcessorPil", "llava": "CLIPImageProcessorPil",
                     "qwen2_vl": "Qwen2VLImageProcessorPil", "qwen2_5_vl": "Qwen2VLImageProcessorPil"}


def fixture_json(name: str, file: str) -> dict:
    p = FIXTURES / name / file
    return json.loads(p.read_text()) if p.exists() else {}


def _remap(d: dict, ids: dict[int, int]) -> dict:
    out = dict(d)
    for k in _ID_KEYS:
        v = out.get(k)
        if isinstance(v, list):
            out[k] = [ids[i] for i in v if i in ids]
        elif isinstance(v, int):
            out[k] = ids.get(v, v if k not in ("bos_token_id", "pad_token_id") else None)
    return out


def reduced_config(name: str, tok) -> dict:
    """config.json of `name` with fewer layers, the stand-in vocab and its token ids (see module doc)."""
    cfg = fixture_json(name, "config.json")
    ids = _id_map(cfg["model_type"], tok)
    text, vision = dict(cfg["text_config"]), dict(cfg["vision_config"])
    text.update(num_hidden_layers=TEXT_LAYERS, vocab_size=len(tok),
                intermediate_size=min(int(text["intermediate_size"]), MAX_INTERMEDIATE))
    if "depth" in vision:  # Qwen vision tower
        vision["depth"] = VISION_LAYERS
        if "fullatt_block_indexes" in vision:
            vision["fullatt_block_indexes"] = [VISION_LAYERS - 1]
    else:
        vision["num_hidden_layers"] = VISION_LAYERS
    cfg = _remap(cfg, ids)
    cfg.update(text_config=_remap(text, ids), vision_config=vision)
    if cfg["model_type"] == "llava":  # vision_feature_layer -2 needs 2 vision layers
        cfg["vision_config"]["num_hidden_layers"] = 2
    return cfg


def _id_map(model_type: str, tok) -> dict[int, int]:
    return {pub: tok.convert_tokens_to_ids(s) for pub, s in _TOKENS[model_type][4].items()}


def stand_in_tokenizer(model_type: str):
    from infmllm_ros.engine.tiny import build_tokenizer

    specials, bos, eos, pad, _ = _TOKENS[model_type]
    return build_tokenizer(specials, vocab_size=600, bos=bos, eos=eos, pad=pad)


def build(name: str, out: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write model (random weights, `dtype`) + processor + generation_config of fixture `name` into `out`."""
    import transformers as tf

    from infmllm_ros.engine import loading

    out = Path(out)
    model_type = fixture_json(name, "config.json")["model_type"]
    tok = stand_in_tokenizer(model_type)
    cfg_dict = reduced_config(name, tok)
    cfg = tf.AutoConfig.for_model(**cfg_dict)
    model_cls, proc_cls = loading.classes_for(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(cfg).to(dtype).eval()
    pre = {k: v for k, v in fixture_json(name, "preprocessor_config.json").items()
           if k not in ("image_processor_type", "processor_class", "video_sampling")}
    image_processor = getattr(tf, _IMAGE_PROCESSORS[model_type])(**pre)
    proc_kwargs = {k: v for k, v in fixture_json(name, "processor_config.json").items() if k != "processor_class"}
    processor = proc_cls(image_processor=image_processor, tokenizer=tok, **proc_kwargs)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    gen = fixture_json(name, "generation_config.json")
    if gen:
        (out / "generation_config.json").write_text(json.dumps(_remap(gen, _id_map(model_type, tok)), indent=2))
    return out

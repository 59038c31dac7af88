"""Print docs/MODELS.md's table from test/fixtures (run: .venv/bin/python test/models/models_table.py).

Per checkpoint, from its published config at its real layer count (weights on the meta device, nothing allocated):
tokens per 640x480 frame at three frame.tokens settings (the adapter's chunk, measured through the real image
processor; the ~10-20 text tokens around the image counted with the stand-in tokenizer), KV bytes per token in
bf16, weight bytes in bf16, and the cache budget the automatic sizing (memory.size_cache) picks on four devices."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_build import _IMAGE_PROCESSORS, NAMES, fixture_json, stand_in_tokenizer  # noqa: E402

from infmllm_ros.engine import loading, memory  # noqa: E402
from infmllm_ros.engine.adapters import adapter_for  # noqa: E402

GIB = 2**30
# memory the process can use: Jetson memory is shared with the OS, ROS and the camera stack (2 GiB assumed);
# a desktop GPU loses ~0.5 GiB to the CUDA context
DEVICES = {"Orin Nano 8 GB": 8 * GIB - 2 * GIB, "Orin NX 16 GB": 16 * GIB - 2 * GIB,
           "AGX Orin 64 GB": 64 * GIB - 2 * GIB, "24 GB desktop GPU": 24 * GIB - GIB // 2}
HUB_IDS = {"SmolVLM-256M-Instruct": "HuggingFaceTB/SmolVLM-256M-Instruct",
           "SmolVLM2-2.2B-Instruct": "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
           "llava-onevision-qwen2-0.5b-ov-hf": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
           "llava-1.5-7b-hf": "llava-hf/llava-1.5-7b-hf", "Qwen2-VL-2B-Instruct": "Qwen/Qwen2-VL-2B-Instruct",
           "Qwen2.5-VL-3B-Instruct": "Qwen/Qwen2.5-VL-3B-Instruct",
           "Qwen2.5-VL-7B-Instruct": "Qwen/Qwen2.5-VL-7B-Instruct"}
FRAME_TOKENS = (128, 256, 1024)


def row(name: str) -> dict:
    cfg_dict = fixture_json(name, "config.json")
    mt = cfg_dict["model_type"]
    tok = stand_in_tokenizer(mt)
    cfg = tf.AutoConfig.for_model(**cfg_dict)
    model_cls, proc_cls = loading.classes_for(mt)
    with torch.device("meta"):
        model = model_cls(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    pre = {k: v for k, v in fixture_json(name, "preprocessor_config.json").items()
           if k not in ("image_processor_type", "processor_class", "video_sampling")}
    proc_kwargs = {k: v for k, v in fixture_json(name, "processor_config.json").items() if k != "processor_class"}
    proc = proc_cls(image_processor=getattr(tf, _IMAGE_PROCESSORS[mt])(**pre), tokenizer=tok, **proc_kwargs)
    text = cfg.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2
    tpf, worst = {}, {}
    for t in FRAME_TOKENS:
        ad = adapter_for(model, proc)
        ad.configure_frames(t, None)
        tpf[t] = ad.frame_chunk_tokens(ad.REFERENCE_SHAPES[0])
        worst[t] = max(ad.frame_chunk_tokens(s) for s in ad.REFERENCE_SHAPES)
    weights = n_params * 2
    budgets = {}
    for dev, avail in DEVICES.items():
        free_after = avail - weights
        max_chunk, extra = max(worst[256], memory.INSTRUCTION_TOKENS), max(worst[256], 256) + 64
        slots = int((free_after * (1 - memory.AUTO_MARGIN) - memory.ACTIVATION_RESERVE) // kv_per_token)
        b = min(slots - extra, text.max_position_embeddings - max_chunk - 64)
        budgets[dev] = (b, b // tpf[256]) if b >= 64 else None
    return dict(name=name, params=n_params, weights=weights, kv=kv_per_token, tpf=tpf, budgets=budgets,
                maxpos=text.max_position_embeddings)


def main():
    rows = [row(n) for n in NAMES]
    print("| checkpoint | tokens/frame at frame.tokens " + " / ".join(map(str, FRAME_TOKENS)) +
          " | KV bytes/token (bf16) | weights (bf16) | max positions |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {' / '.join(str(r['tpf'][t]) for t in FRAME_TOKENS)} | {r['kv']:,} | "
              f"{r['weights'] / 1e9:.2f} GB ({r['params'] / 1e9:.2f} B params) | {r['maxpos']:,} |")
    print()
    print("| checkpoint | " + " | ".join(DEVICES) + " |")
    print("|---|" + "---|" * len(DEVICES))
    for r in rows:
        cells = [f"{b[0]:,} tokens = {b[1]:,} frames" if b else "does not fit" for b in r["budgets"].values()]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")
    print()
    for r in rows:
        print(f"    ros2 launch infmllm_ros robot.launch.py model:={HUB_IDS[r['name']]} device:=cuda")


if __name__ == "__main__":
    main()

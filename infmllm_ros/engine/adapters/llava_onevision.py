"""LlavaOnevision (Qwen2 + SigLIP): 1-D RoPE.

Frame size: the processor's anyres path costs base 729 + grid features per frame (1332 tokens at 640x480 on the
0.5b checkpoint). When frame.tokens is below that, frames go through the model's own video path instead: one
384x384 tile, 2x2 bilinear pooling in the model (27x27 -> 14x14 = 196 tokens) + 1 newline, which is how
LLaVA-OneVision was trained to see video frames. The video processor needs torchvision, so the tile is made here
with the image processor's resize/normalise settings (the checkpoint's SigLIP mean/std)."""

import math

import numpy as np
import torch
from PIL import Image

from infmllm_ros.engine.adapters.base import Adapter, Chunk, size_get


class LlavaOnevisionAdapter(Adapter):
    model_types = ("llava_onevision",)
    image_placeholder = "<image>\n"
    pooled = False

    def configure_frames(self, tokens=None, max_side=None) -> None:
        super().configure_frames(tokens, max_side)
        self.pooled = False
        if self.frame_tokens and max(self.frame_chunk_tokens(s) for s in self.REFERENCE_SHAPES) > self.frame_tokens:
            self.pooled = True

    def pooled_tokens(self) -> int:
        v = self.model.config.vision_config
        side = math.ceil((v.image_size // v.patch_size) / 2)
        return side * side + 1  # + image_newline, as LlavaOnevisionProcessor counts video tokens

    def video_token(self) -> str:
        return getattr(self.processor, "video_token", "<video>")

    def frame_text(self, stamp: float) -> str:
        if not self.pooled:
            return super().frame_text(stamp)
        return self.turns.frame_open + f"t={stamp:.1f}s " + self.video_token() * self.pooled_tokens() + "\n" + \
            self.turns.user_close

    def encode_images(self, text: str, images: list) -> Chunk:
        if not self.pooled:
            return super().encode_images(text, images)
        ip = self.processor.image_processor
        h, w = int(size_get(ip.size, "height") or 384), int(size_get(ip.size, "width") or 384)
        tiles = []
        for img in images:
            x = np.asarray(img.convert("RGB").resize((w, h), Image.BICUBIC), np.float32) * float(ip.rescale_factor)
            x = (x - np.asarray(ip.image_mean, np.float32)) / np.asarray(ip.image_std, np.float32)
            tiles.append(torch.from_numpy(x).permute(2, 0, 1))
        ids = torch.tensor([self.encode(text)], dtype=torch.long)
        video_id = self.tokenizer.convert_tokens_to_ids(self.video_token())
        return Chunk(ids=ids, model_kwargs={"pixel_values_videos": torch.stack(tiles).unsqueeze(0)},
                     mm_token_type_ids=(ids == video_id).long())

    def frame_bounds(self):
        # why: anyres tiles an image up to the pinpoint grid; one tile per frame keeps tokens/frame small and fixed
        return 8, self.max_side or self.tile_size()

"""Qwen2-VL / Qwen2.5-VL: M-RoPE. A chunk's (3, 1, q) positions come from get_rope_index over the chunk alone,
offset by the next free position; decoded tokens get the same position on all three rows.

Frame size: one visual token per (patch * merge)^2 pixels, so frame.tokens maps to the processor's max_pixels
(size["longest_edge"]) = tokens * 28 * 28; smart_resize keeps the aspect ratio and stays under it."""

import math

import torch

from infmllm_ros.engine.adapters.base import Adapter, Chunk, size_get


class Qwen2VLAdapter(Adapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"

    def positions(self, chunk: Chunk, start: int) -> torch.Tensor:
        q = chunk.length
        if chunk.mm_token_type_ids is None or not bool(chunk.mm_token_type_ids.any()):
            return (start + torch.arange(q, device=chunk.ids.device)).view(1, 1, q).expand(3, 1, q).contiguous()
        pos, _ = self.model.model.get_rope_index(chunk.ids, mm_token_type_ids=chunk.mm_token_type_ids,
                                                 image_grid_thw=chunk.model_kwargs.get("image_grid_thw"))
        return pos + start

    def decode_positions(self, start: int, device) -> torch.Tensor:
        return torch.full((3, 1, 1), start, device=device, dtype=torch.long)

    def reset(self) -> None:
        self.model.model.rope_deltas = None  # model state; stale deltas would shift a fresh stream

    def pixels_per_token(self) -> int:
        ip = self.processor.image_processor
        return (ip.patch_size * ip.merge_size) ** 2

    def configure_frames(self, tokens=None, max_side=None) -> None:
        super().configure_frames(tokens, max_side)
        if self.frame_tokens:
            ip = self.processor.image_processor
            max_pixels = self.frame_tokens * self.pixels_per_token()
            min_pixels = min(int(size_get(ip.size, "shortest_edge") or 56 * 56), max_pixels)
            self.image_kwargs["size"] = {"shortest_edge": min_pixels, "longest_edge": max_pixels}

    def frame_bounds(self):
        ip = self.processor.image_processor
        factor = ip.patch_size * ip.merge_size
        if self.frame_tokens:  # the processor fits the pixel budget; pre-shrink only far larger frames (speed)
            return factor, self.max_side or 2 * math.isqrt(self.frame_tokens * self.pixels_per_token() * 4)
        max_pixels = size_get(ip.size, "longest_edge") or getattr(ip, "max_pixels", None) or 448 * 448
        # why 448: real checkpoints allow ~3584 px sides (thousands of tokens); a stream wants <= ~256 per frame
        return factor, self.max_side or min(448, int(math.isqrt(int(max_pixels))))

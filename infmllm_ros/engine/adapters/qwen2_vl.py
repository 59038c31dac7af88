"""Qwen2-VL / Qwen2.5-VL: M-RoPE. A chunk's (3, 1, q) positions come from get_rope_index over the chunk alone,
offset by the next free position; decoded tokens get the same position on all three rows."""

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

    def frame_bounds(self):
        ip = self.processor.image_processor
        factor = ip.patch_size * ip.merge_size
        max_pixels = size_get(ip.size, "longest_edge") or getattr(ip, "max_pixels", None) or 448 * 448
        # why 448: real checkpoints allow ~3584 px sides (thousands of tokens); a stream wants <= ~256 per frame
        return factor, min(448, int(math.isqrt(int(max_pixels))))

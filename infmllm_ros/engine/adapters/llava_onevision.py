"""LlavaOnevision (Qwen2 + SigLIP, anyres): 1-D RoPE; frames capped at one tile so anyres adds few patches."""

from infmllm_ros.engine.adapters.base import Adapter


class LlavaOnevisionAdapter(Adapter):
    model_types = ("llava_onevision",)
    image_placeholder = "<image>\n"

    def frame_bounds(self):
        # why: anyres tiles an image up to the pinpoint grid; one tile per frame keeps tokens/frame small and fixed
        return 8, self.tile_size()

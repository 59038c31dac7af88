"""Idefics3 and SmolVLM (Llama/SmolLM text): 1-D RoPE; frames are not split into tiles (global view only)."""

from infmllm_ros.engine.adapters.base import Adapter, Turns, size_get

IDEFICS = Turns(prefix="<|im_start|>", system="System: {system}<end_of_utterance>\n", frame_open="User:",
                user_open="User: ", user_close="<end_of_utterance>\n", assistant_open="Assistant:",
                assistant_close="<end_of_utterance>\n")


class Idefics3Adapter(Adapter):
    model_types = ("idefics3", "smolvlm")
    image_placeholder = "<image>"
    # why: splitting turns one frame into up to 4x4+1 tiles; a stream wants a small fixed cost per frame
    image_kwargs = {"do_image_splitting": False}

    def make_turns(self):
        return IDEFICS

    def tile_size(self) -> int:
        return int(size_get(self.processor.image_processor.max_image_size, "longest_edge") or 364)

    def frame_bounds(self):
        return 8, self.tile_size()

    def language_model(self):
        return self.model.model.text_model

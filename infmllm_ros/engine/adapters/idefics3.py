"""Idefics3 and SmolVLM (Llama/SmolLM text): 1-D RoPE.

Frame size: a frame is one global tile of image_seq_len tokens (splitting off), or, when frame.tokens allows it,
split into a grid of tiles at longest_edge = k * tile plus the global tile; k is the largest whose worst case over
the reference frame shapes stays within frame.tokens."""

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

    def configure_frames(self, tokens=None, max_side=None) -> None:
        super().configure_frames(tokens, max_side)
        self.image_kwargs, self._split_side = {"do_image_splitting": False}, None
        if not self.frame_tokens:
            return
        tile = self.tile_size()
        most = int(size_get(self.processor.image_processor.size, "longest_edge") or 4 * tile) // tile
        for k in range(most, 1, -1):
            self._split_side = k * tile
            self.image_kwargs = {"do_image_splitting": True, "size": {"longest_edge": k * tile}}
            if max(self.frame_chunk_tokens(s) for s in self.REFERENCE_SHAPES) <= self.frame_tokens:
                return
        self.image_kwargs, self._split_side = {"do_image_splitting": False}, None

    def frame_bounds(self):
        return 8, self.max_side or getattr(self, "_split_side", None) or self.tile_size()

    def language_model(self):
        return self.model.model.text_model

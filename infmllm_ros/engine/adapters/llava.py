"""Llava (Llama/Vicuna or Qwen2 text, CLIP or SigLIP vision): 1-D RoPE, one fixed tile per frame."""

from infmllm_ros.engine.adapters.base import CHATML, VICUNA, Adapter


class LlavaAdapter(Adapter):
    model_types = ("llava",)

    def _chatml(self) -> bool:
        return "<|im_start|>" in self.tokenizer.get_vocab()

    def make_turns(self):
        return CHATML if self._chatml() else VICUNA

    def add_bos(self) -> bool:
        return not self._chatml()

    @property
    def image_placeholder(self):
        return self.processor.image_token + "\n"

"""What one model family must say: chat pieces, image chunk encoding, positions, the language sub-module.

An adapter never touches the cache; it turns text/images into token ids + model kwargs and says which explicit
positions a chunk takes, given the next free position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Keys of a processor output that are not model inputs for a chunk forward (positions are explicit, mask is None).
_NOT_MODEL_KWARGS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass(frozen=True)
class Turns:
    """Chat-template pieces; a frame is a user turn with a time marker + image, a question a user turn + assistant."""

    prefix: str = ""  # once, at the very start (after BOS)
    system: str = "{system}"  # format string for the system prompt, appended to prefix when a prompt is given
    frame_open: str = ""
    user_open: str = ""
    user_close: str = ""
    assistant_open: str = ""
    assistant_close: str = ""  # closes an answer turn; starts with EOS when the template ends answers with EOS


VICUNA = Turns(system="{system} ", frame_open="USER: ", user_open="USER: ", user_close=" ", assistant_open="ASSISTANT:",
               assistant_close="{eos} ")
CHATML = Turns(system="<|im_start|>system\n{system}<|im_end|>\n", frame_open="<|im_start|>user\n",
               user_open="<|im_start|>user\n", user_close="<|im_end|>\n", assistant_open="<|im_start|>assistant\n",
               assistant_close="<|im_end|>\n")


@dataclass
class Chunk:
    """One prefill chunk: token ids (1, q), model kwargs (pixels), modality types (1, q) (1 = image token)."""

    ids: torch.Tensor
    model_kwargs: dict = field(default_factory=dict)
    mm_token_type_ids: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.ids.shape[1]


def size_get(size, key):
    """A processor size field: a plain dict or transformers 5's SizeDict (attributes)."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def time_marker(stamp: float) -> str:
    return f"t={stamp:.1f}s "


class Adapter:
    """Base: 1-D RoPE families (position = next free position + index in chunk)."""

    model_types: tuple[str, ...] = ()
    image_placeholder = "<image>"
    image_kwargs: dict = {}  # extra processor kwargs for frames

    # Frame shapes measured at configure: the first is the reported size (a VGA camera), the others bound the
    # chunk a frame of another aspect ratio can take.
    REFERENCE_SHAPES = ((480, 640), (640, 480), (720, 1280), (1280, 720))

    def __init__(self, model, processor):
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.turns = self.make_turns()
        self.image_kwargs = dict(self.image_kwargs)  # per instance: configure_frames may change it
        self.frame_tokens: int | None = None  # target tokens per frame (node parameter frame.tokens); None = default
        self.max_side: int | None = None  # longer side frames are resized to first (frame.max_side); None = derived

    # -- frame size ----------------------------------------------------------------------------------------------
    def configure_frames(self, tokens: int | None = None, max_side: int | None = None) -> None:
        """Map the node's frame.tokens / frame.max_side onto this family's processor knobs. Base: one fixed-size
        tile per frame (LLaVA-1.5), so only max_side applies and the token count is what the model needs."""
        self.frame_tokens, self.max_side = tokens or None, max_side or None

    def frame_chunk_tokens(self, shape: tuple[int, int]) -> int:
        """Chunk length of one frame of `shape` (h, w) at stamp 0, text wrappers included (processor only)."""
        import numpy as np

        from infmllm_ros.engine import frames

        lo, hi = self.frame_bounds()
        img = frames.fit(np.full((*shape, 3), 128, np.uint8), lo, hi)
        return self.encode_images(self.frame_text(0.0), [img]).length

    # -- chat pieces ---------------------------------------------------------------------------------------------
    def make_turns(self) -> Turns:
        return CHATML

    def add_bos(self) -> bool:
        return False

    def prefix_text(self, system_prompt: str | None) -> str:
        t = self.turns
        bos = self.tokenizer.bos_token if self.add_bos() and self.tokenizer.bos_token else ""
        return bos + t.prefix + (t.system.format(system=system_prompt) if system_prompt else "")

    def frame_text(self, stamp: float) -> str:
        return self.turns.frame_open + time_marker(stamp) + self.image_placeholder + self.turns.user_close

    def question_wrap(self) -> tuple[str, str]:
        return self.turns.user_open, self.turns.user_close + self.turns.assistant_open

    def close_text(self) -> str:
        return self.turns.assistant_close.format(eos=self.tokenizer.eos_token or "")

    # -- encoding ------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Template text: special tokens are recognised."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_user(self, text: str) -> list[int]:
        """User text: special-token strings are split into plain text (no injected <image> etc.)."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def encode_images(self, text: str, images: list) -> Chunk:
        out = self.processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False,
                             **self.image_kwargs)
        ids = out["input_ids"]
        mm = out.get("mm_token_type_ids")
        if mm is None:
            mm = (ids == self.image_token_id()).long()
        kwargs = {k: v for k, v in out.items() if k not in _NOT_MODEL_KWARGS}
        return Chunk(ids=ids, model_kwargs=kwargs, mm_token_type_ids=mm)

    def image_token_id(self) -> int:
        cfg = self.model.config
        for name in ("image_token_id", "image_token_index"):
            if getattr(cfg, name, None) is not None:
                return getattr(cfg, name)
        return self.tokenizer.convert_tokens_to_ids(self.image_placeholder)

    def never_generate(self) -> list[int]:
        """Placeholder ids that would demand pixels if fed back (a stray <image> breaks the next forward)."""
        cfg = self.model.config
        names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
        return sorted({getattr(cfg, n) for n in names if isinstance(getattr(cfg, n, None), int)})

    # -- positions -----------------------------------------------------------------------------------------------
    def positions(self, chunk: Chunk, start: int) -> torch.Tensor:
        return torch.arange(start, start + chunk.length, device=chunk.ids.device).unsqueeze(0)

    def decode_positions(self, start: int, device) -> torch.Tensor:
        return torch.tensor([[start]], device=device)

    def merge_positions(self, chunk: Chunk) -> None:
        """Hook for families that keep position state in the model (Qwen rope_deltas)."""

    def reset(self) -> None:
        """Clear per-stream model state."""

    # -- geometry / modules --------------------------------------------------------------------------------------
    def tile_size(self) -> int:
        ip = self.processor.image_processor
        for src in (getattr(ip, "crop_size", None), getattr(ip, "size", None)):
            for k in ("height", "shortest_edge", "longest_edge"):
                if size_get(src, k):
                    return int(size_get(src, k))
        return 336

    def frame_bounds(self) -> tuple[int, int]:
        """(min_side, max_side) frames are resized into before the processor."""
        return 8, self.max_side or 2 * self.tile_size()

    def language_model(self):
        return self.model.model.language_model

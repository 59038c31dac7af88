"""Image-only processor subclasses.

Why: LlavaOnevision, SmolVLM and Qwen2-VL processors own a video processor, which needs torchvision; without it
they cannot be built (`video_processor=None` raises) and `AutoProcessor` on a LlavaOnevision dir silently returns
only the tokenizer. These subclasses drop the video processor from `__init__`, so `from_pretrained` loads just the
image processor (the PIL one when torchvision is missing) and the tokenizer. The session never sends video.
"""

from __future__ import annotations

from types import SimpleNamespace

from transformers import LlavaOnevisionProcessor, Qwen2VLProcessor, SmolVLMProcessor

try:  # Qwen2.5-VL shares the Qwen2-VL adapter; its processor may be absent in older transformers
    from transformers import Qwen2_5_VLProcessor
except ImportError:  # pragma: no cover
    Qwen2_5_VLProcessor = None


class OnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None, vision_feature_select_strategy=None,
                 chat_template=None, image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_9",
                 **kwargs):
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, video_token=video_token, vision_aspect_ratio=vision_aspect_ratio,
                         **kwargs)


class SmolVLMImageOnlyProcessor(SmolVLMProcessor):
    # apply_chat_template reads these even for image-only chats
    video_processor = SimpleNamespace(num_frames=64, fps=1)

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len=169, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_len=image_seq_len, chat_template=chat_template,
                         **kwargs)


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


if Qwen2_5_VLProcessor is not None:
    class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
else:  # pragma: no cover
    Qwen2_5_VLImageOnlyProcessor = None

"""infmllm_ros: one continuous vision-language-model session for a robot, on a bounded Inf-MLLM KV cache."""

__version__ = "0.1.0"

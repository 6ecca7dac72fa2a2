"""pyvl: a small, fast inference runtime for the InternVL 1.5 family.

model = pyvl.load("InternVL-Chat-V1-5", device="cuda", dtype="bfloat16")
pixel_values = pyvl.load_image("photo.jpg", max_num=12)
model.chat(pixel_values, "Describe this image.", generation_config=dict(max_new_tokens=512))
"""

from .api import load
from .chat import ChatResult, ChatStats, InternVLChat
from .errors import CheckpointError, ConfigError, ImageError, PromptError, PyvlError, WorkerError
from .generation_config import GenerationConfig
from .image import load_image

__version__ = "0.1.0"

# fmt: off
__all__ = [
    "load", "load_image", "InternVLChat", "ChatStats", "ChatResult", "GenerationConfig",
    "PyvlError", "ConfigError", "CheckpointError", "ImageError", "PromptError", "WorkerError", "__version__",
]
# fmt: on

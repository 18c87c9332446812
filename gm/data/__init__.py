"""Training data: the DreamBooth folder pipeline and the built-in toy subject."""

from gm.data.dreambooth import (
    IMAGE_EXTENSIONS,
    SIZE_KEYS,
    DreamBoothDataset,
    PairIndex,
    PairSchedule,
    collate,
    count_images,
    model_inputs,
    open_rgb,
    validate_image_folder,
    validate_instance_folder,
)
from gm.data.toy_subject import TOY_CLASS_PROMPT, TOY_INSTANCE_PROMPT, draw_toy_subject, render_toy_photo

__all__ = [
    "IMAGE_EXTENSIONS", "SIZE_KEYS", "DreamBoothDataset", "PairIndex", "PairSchedule", "collate", "count_images",
    "model_inputs", "open_rgb", "validate_image_folder", "validate_instance_folder",
    "TOY_CLASS_PROMPT", "TOY_INSTANCE_PROMPT", "draw_toy_subject", "render_toy_photo",
]

"""Image preprocessing of the evaluation models, exactly as transformers' PIL image processors do it
(``CLIPImageProcessor`` and ``ViTImageProcessor``, read from a model folder's
``preprocessor_config.json``): convert to RGB (transparency composited onto white), resize
(shortest edge to ``size``, the long edge truncated to an int; or to a fixed height x width) with
PIL, center crop (top/left rounded down), rescale by 1/255 in float64, normalise per channel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from gm.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImagePreprocessor:
    """The fields of a ``preprocessor_config.json`` that decide the pixels."""

    size: Dict[str, int] = field(default_factory=lambda: {"shortest_edge": 224})
    crop_size: Optional[Dict[str, int]] = field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = int(Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True
    image_mean: Tuple[float, ...] = CLIP_MEAN
    image_std: Tuple[float, ...] = CLIP_STD
    # how an old config's plain ``size: 224`` reads: a square (ViT) or the shortest edge (CLIP)
    default_to_square: bool = False

    @classmethod
    def clip(cls) -> ImagePreprocessor:
        """CLIPImageProcessor's defaults (openai/clip-vit-large-patch14)."""
        return cls()

    @classmethod
    def vit(cls) -> ImagePreprocessor:
        """ViTImageProcessor's defaults: 224 x 224, bilinear, no crop, mean = std = 0.5 (facebook/dino-vits16's
        preprocessor_config.json replaces them with ImageNet's, see ``from_folder``)."""
        return cls(size={"height": 224, "width": 224}, crop_size=None, resample=int(Image.Resampling.BILINEAR),
                   do_center_crop=False, do_convert_rgb=False, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                   default_to_square=True)

    @classmethod
    def from_folder(cls, folder: str | Path, default: ImagePreprocessor) -> ImagePreprocessor:
        """``folder/preprocessor_config.json`` over ``default`` (the model type's processor defaults)."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return default
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not readable JSON ({err})") from None
        values = dict(default.__dict__)
        for key in values:
            if key in raw and raw[key] is not None:
                values[key] = raw[key]
        if isinstance(values["size"], int):
            n = values["size"]
            values["size"] = {"height": n, "width": n} if default.default_to_square else {"shortest_edge": n}
        if isinstance(values["crop_size"], int):
            values["crop_size"] = {"height": values["crop_size"], "width": values["crop_size"]}
        values["image_mean"] = tuple(values["image_mean"])
        values["image_std"] = tuple(values["image_std"])
        return cls(**values)

    def _target_size(self, height: int, width: int) -> Tuple[int, int]:
        if "shortest_edge" in self.size:
            short = self.size["shortest_edge"]
            if width <= height:
                return int(short * height / width), short
            return short, int(short * width / height)
        return self.size["height"], self.size["width"]

    def one(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> float32 (3, H, W)."""
        if self.do_convert_rgb:
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            image = image.convert("RGB")
        elif image.mode != "RGB":
            image = image.convert("RGB")
        if self.do_resize:
            height, width = self._target_size(image.height, image.width)
            image = image.resize((width, height), resample=Image.Resampling(self.resample))
        pixels = np.asarray(image)
        if self.do_center_crop and self.crop_size:
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        out = pixels.astype(np.float64)
        if self.do_rescale:
            out = out * self.rescale_factor
        out = out.astype(np.float32)
        if self.do_normalize:
            mean = np.array(self.image_mean, np.float32)
            std = np.array(self.image_std, np.float32)
            out = (out - mean) / std
        return out.transpose(2, 0, 1).astype(np.float32)

    def __call__(self, images: Sequence) -> np.ndarray:
        """PIL images (or uint8 HWC arrays) -> float32 (N, 3, H, W)."""
        return np.stack([self.one(im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8)))
                         for im in images])


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) -> (height, width, C); an image smaller than the crop is padded with zeros first."""
    h, w = pixels.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), pixels.shape[2]), pixels.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top:top + h, left:left + w] = pixels
        pixels, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top:top + height, left:left + width]

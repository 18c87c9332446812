"""The DreamBooth paper's evaluation models, loaded from transformers-format weights (no torch):
CLIP (image and text embeddings; CLIP-I, CLIP-T) and DINO ViT-S/16 (image embeddings; DINO).

``path`` is a model folder (``config.json``, ``model.safetensors``, optionally
``preprocessor_config.json`` and the tokenizer files, as ``openai/clip-vit-large-patch14`` and
``facebook/dino-vits16`` are published) or a single ``.safetensors`` file of one of them (the
architecture is then read off the tensor shapes; heads = width / 64, as in every CLIP and DINO ViT;
the processor's defaults apply).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

from gm.errors import ConfigError
from gm.metrics.preprocess import ImagePreprocessor

HEAD_WIDTH = 64


def _weights_file(path: Path, what: str) -> Path:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ConfigError(f"--{what} {path}: expected a .safetensors file or a model folder (convert a torch "
                              ".bin first, e.g. save_pretrained(folder, safe_serialization=True))")
        return path
    if not path.is_dir():
        raise ConfigError(f"--{what} {path}: no such file or folder")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"--{what} {path}: the folder holds no .safetensors weights")
    return path / "model.safetensors" if (path / "model.safetensors").is_file() else files[0]


def _read(path: Path) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: np.asarray(v, np.float32) for k, v in load_file(str(path)).items()}


def _config(path: Path) -> Mapping:
    file = path / "config.json" if path.is_dir() else None
    return json.loads(file.read_text()) if file is not None and file.is_file() else {}


def _count_layers(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _assign(cell, arrays: Mapping[str, np.ndarray], what: str, ignored: Tuple[str, ...] = ()) -> None:
    from mindspore import Tensor

    params = dict(cell.parameters_and_names())
    missing = sorted(set(params) - set(arrays))
    unused = sorted(k for k in set(arrays) - set(params) if not k.startswith(ignored))
    if missing or unused:
        raise ConfigError(f"{what}: the weights do not fit (missing {missing[:3]}, unexpected {unused[:3]})")
    for name, param in params.items():
        if tuple(param.shape) != arrays[name].shape:
            raise ConfigError(f"{what}: {name} is {arrays[name].shape} in the file, {tuple(param.shape)} in the model")
        param.set_data(Tensor(arrays[name]))


class ClipEvaluator:
    """CLIP image and text embeddings (L2-normalised, numpy)."""

    def __init__(self, path: str | Path):
        from gm.modules.embedders.tokenizer import EOT_TOKEN, CLIPTextTokenizer
        from gm.modules.vision import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        path = Path(path)
        arrays = _read(_weights_file(path, "clip"))
        cfg = _config(path)
        vision_cfg, text_cfg = cfg.get("vision_config", {}), cfg.get("text_config", {})
        keys = arrays.keys()
        patch = arrays["vision_model.embeddings.patch_embedding.weight"]
        width = patch.shape[0]
        projection = arrays["visual_projection.weight"].shape[0]
        grid = int(round(np.sqrt(arrays["vision_model.embeddings.position_embedding.weight"].shape[0] - 1)))
        self.vision = CLIPVisionModelWithProjection(
            width, _count_layers(keys, r"vision_model\.encoder\.layers\.(\d+)\."),
            vision_cfg.get("num_attention_heads", width // HEAD_WIDTH),
            arrays["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0], grid * patch.shape[2], patch.shape[2],
            projection, vision_cfg.get("layer_norm_eps", 1e-5))
        _assign(self.vision, {k: v for k, v in arrays.items() if k.startswith(("vision_model.", "visual_projection."))},
                f"--clip {path} (image tower)")
        text_width = arrays["text_model.embeddings.token_embedding.weight"].shape[1]
        self.text = CLIPTextModelWithProjection(
            text_width, _count_layers(keys, r"text_model\.encoder\.layers\.(\d+)\."),
            text_cfg.get("num_attention_heads", text_width // HEAD_WIDTH),
            arrays["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0], arrays["text_projection.weight"].shape[0],
            arrays["text_model.embeddings.token_embedding.weight"].shape[0],
            arrays["text_model.embeddings.position_embedding.weight"].shape[0])
        _assign(self.text, {k: v for k, v in arrays.items() if k.startswith(("text_model.", "text_projection."))},
                f"--clip {path} (text tower)", ignored=("text_model.embeddings.position_ids",))
        for act in (vision_cfg.get("hidden_act"), text_cfg.get("hidden_act")):
            if act not in (None, "quick_gelu"):
                raise ConfigError(f"--clip {path}: hidden_act {act}; this evaluator runs OpenAI CLIP (quick_gelu)")
        self.tokenizer = CLIPTextTokenizer(EOT_TOKEN, self.text.text_model.embeddings.max_length,
                                           path if (path / "vocab.json").is_file() else None)
        self.preprocess = ImagePreprocessor.from_folder(path, ImagePreprocessor.clip()) if path.is_dir() else \
            ImagePreprocessor.clip()

    def image_embeds(self, images: Sequence, batch_size: int = 16) -> np.ndarray:
        return _embed(self.vision, self.preprocess, images, batch_size)

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        from mindspore import Tensor

        from gm.frozen_inputs import eager

        with eager():
            out = self.text(Tensor(self.tokenizer(list(prompts)))).asnumpy()
        return _unit(out)


class DinoEvaluator:
    """DINO ViT class-token embeddings (L2-normalised, numpy)."""

    def __init__(self, path: str | Path):
        from gm.modules.vision import DinoViTModel

        path = Path(path)
        raw = _read(_weights_file(path, "dino"))
        # a ViTModel saved inside a classifier carries a "vit." prefix
        arrays = {k[4:] if k.startswith("vit.") else k: v for k, v in raw.items()}
        cfg = _config(path)
        patch = arrays["embeddings.patch_embeddings.projection.weight"]
        width = patch.shape[0]
        grid = int(round(np.sqrt(arrays["embeddings.position_embeddings"].shape[1] - 1)))
        self.model = DinoViTModel(width, _count_layers(arrays, r"encoder\.layer\.(\d+)\."),
                                  cfg.get("num_attention_heads", width // HEAD_WIDTH),
                                  arrays["encoder.layer.0.intermediate.dense.weight"].shape[0], grid * patch.shape[2],
                                  patch.shape[2], cfg.get("layer_norm_eps", 1e-12))
        _assign(self.model, arrays, f"--dino {path}", ignored=("pooler.", "classifier."))
        self.preprocess = ImagePreprocessor.from_folder(path, ImagePreprocessor.vit()) if path.is_dir() else \
            ImagePreprocessor.vit()

    def image_embeds(self, images: Sequence, batch_size: int = 16) -> np.ndarray:
        return _embed(self.model, self.preprocess, images, batch_size)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _embed(model, preprocess: ImagePreprocessor, images: Sequence, batch_size: int) -> np.ndarray:
    from mindspore import Tensor

    from gm.frozen_inputs import eager

    out = []
    with eager():
        for start in range(0, len(images), batch_size):
            out.append(model(Tensor(preprocess(images[start:start + batch_size]))).asnumpy())
    return _unit(np.concatenate(out))

"""The DreamBooth paper's metrics from embeddings, and its prompt file.

- DINO: mean cosine over all (generated, real subject) pairs of DINO ViT-S/16 class tokens;
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: mean cosine between each generated image's CLIP embedding and its prompt's;
- CLIP score (the reference repo's evaluator, torchmetrics' definition): mean of max(100 cos, 0)
  between each image and its prompt.
The paper's values: real images DINO 0.774, CLIP-I 0.885; DreamBooth on Stable Diffusion DINO
0.668, CLIP-I 0.803, CLIP-T 0.305.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from gm.errors import ConfigError
from gm.metrics.similarity import mean_cross_cosine

LIVE_CLASSES = ("dog", "cat")  # the paper's live subjects get the "Live Subject Prompts"


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def prompt_fidelity(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Per image: cosine between its embedding and its prompt's (rows paired)."""
    return np.sum(_unit(image_embeds) * _unit(text_embeds), axis=-1)


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> float:
    """torchmetrics' CLIPScore: mean over images of max(100 * cos(image, its prompt), 0)."""
    return float(np.mean(np.maximum(100.0 * prompt_fidelity(image_embeds, text_embeds), 0.0)))


def dreambooth_metrics(prompts: Sequence[str], dino_generated: Optional[np.ndarray], dino_real: Optional[np.ndarray],
                       clip_generated: Optional[np.ndarray], clip_real: Optional[np.ndarray],
                       clip_text: Optional[np.ndarray]) -> Dict[str, object]:
    """Overall and per-prompt DINO, CLIP-I, CLIP-T (None where an embedding set is not given).

    ``prompts[i]`` is the prompt of generated image i; ``clip_text[i]`` its text embedding."""
    prompts = list(prompts)

    def numbers(rows) -> Dict[str, Optional[float]]:
        out: Dict[str, Optional[float]] = {"dino": None, "clip_i": None, "clip_t": None}
        if dino_generated is not None:
            out["dino"] = mean_cross_cosine(dino_generated[rows], dino_real)
        if clip_generated is not None:
            out["clip_i"] = mean_cross_cosine(clip_generated[rows], clip_real)
            if clip_text is not None:
                out["clip_t"] = float(np.mean(prompt_fidelity(clip_generated[rows], clip_text[rows])))
        return out

    result: Dict[str, object] = numbers(np.arange(len(prompts)))
    result["images"] = len(prompts)
    result["per_prompt"] = [{"prompt": p, "images": int(sum(q == p for q in prompts)),
                             **numbers(np.array([i for i, q in enumerate(prompts) if q == p]))}
                            for p in dict.fromkeys(prompts)]
    return result


@dataclass
class PromptFile:
    """``prompts_and_classes.txt`` of the DreamBooth dataset: subject -> class, and the prompt lists."""

    classes: Dict[str, str] = field(default_factory=dict)
    object_prompts: List[str] = field(default_factory=list)  # templates with {0} = token, {1} = class
    live_prompts: List[str] = field(default_factory=list)

    def prompts(self, unique_token: str, class_token: str) -> List[str]:
        """The 25 prompts for a subject of ``class_token`` (the live list for dogs and cats)."""
        templates = self.live_prompts if class_token in LIVE_CLASSES and self.live_prompts else self.object_prompts
        return [t.format(unique_token, class_token) for t in templates]


def read_prompt_file(path: str | Path, flag: str = "--prompts") -> PromptFile:
    """The paper's file (a "subject_name,class" table, then "Object Prompts" and "Live Subject Prompts"
    lists of ``'a {0} {1} ...'.format(unique_token, class_token)`` lines), or a plain file of one
    template per line (``{0}``/``{1}`` optional)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    text = path.read_text(encoding="utf-8")
    out = PromptFile()
    if "prompt_list" not in text:
        out.object_prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not out.object_prompts:
            raise ConfigError(f"{flag} {path}: no prompts in the file")
        return out
    section = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.lower().startswith("live subject prompts"):
            section = out.live_prompts
        elif stripped.lower().startswith("object prompts"):
            section = out.object_prompts
        elif (m := re.match(r"^([\w-]+),([\w ]+)$", stripped)) and m.group(1) != "subject_name":
            out.classes[m.group(1)] = m.group(2)
        elif section is not None and (m := re.match(r"^'(.*)'\.format\(", stripped)):
            section.append(m.group(1))
    if not out.object_prompts:
        raise ConfigError(f"{flag} {path}: no 'Object Prompts' prompt_list found")
    return out

"""Did the run learn the subject and keep the class? Sample both prompt sets, read them with a judge.

Training calls :meth:`SubjectEvaluation.run` before the first step (the LoRA is still zero, so
this is the base model) and after the last, with the same prompts and seeds, so the two reports
and the before/after grid differ only by what training changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from gm.inference import Sampler, SamplingOptions, make_grid

_logger = logging.getLogger(__name__)


@dataclass
class EvaluationImages:
    subject: np.ndarray  # uint8 (N, H, W, 3), the subject prompts in turn
    klass: np.ndarray    # uint8 (N, H, W, 3), the class prompt


class SubjectEvaluation:
    """Subject prompts (the instance prompt + each suffix, in turn) and the class prompt, ``num_images``
    each, sampled in batches of ``batch_size`` from fixed seeds, then read by a
    :class:`gm.metrics.toy_world.ToyWorldJudge` against the real subject photos."""

    def __init__(self, judge, real_subject: Sequence, instance_prompt: str, suffixes: Sequence[str],
                 class_prompt: str, class_label: str, num_images: int, batch_size: int, options: SamplingOptions):
        self.judge = judge
        self.real_subject = list(real_subject)
        self.subject_prompts = [f"{instance_prompt} {suffixes[i % len(suffixes)]}".strip()
                                for i in range(num_images)]
        self.class_prompts = [class_prompt] * num_images
        self.class_label = class_label
        self.batch_size = batch_size
        self.options = options

    def _sample(self, sampler: Sampler, prompts: List[str], seed: int) -> np.ndarray:
        parts = []
        for start in range(0, len(prompts), self.batch_size):
            options = SamplingOptions(**{**self.options.__dict__, "seed": seed + start})
            parts.append(sampler(prompts[start:start + self.batch_size], options))
        return np.concatenate(parts)

    def run(self, sampler: Sampler) -> Tuple[Dict[str, float], EvaluationImages]:
        """The judge's report (``ToyWorldJudge.report``) and the images it read."""
        images = EvaluationImages(subject=self._sample(sampler, self.subject_prompts, self.options.seed),
                                  klass=self._sample(sampler, self.class_prompts, self.options.seed + 10_000))
        report = self.judge.report(images.subject, self.real_subject, images.klass, self.class_label)
        return report, images


def before_after_grid(before: EvaluationImages, after: EvaluationImages, path: Path, columns: int = 8) -> None:
    """Rows: subject prompts before, after; class prompt before, after (the first ``columns`` each)."""
    rows = [before.subject[:columns], after.subject[:columns], before.klass[:columns], after.klass[:columns]]
    make_grid(np.concatenate(rows), cols=min(columns, len(rows[0]))).save(path)


def describe(before: Dict[str, float], after: Dict[str, float]) -> str:
    """One log line: each number before -> after."""
    return "; ".join(f"{key} {before[key]:.3f} -> {after[key]:.3f}" for key in after)

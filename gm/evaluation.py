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


class PaperMetrics:
    """The DreamBooth paper's DINO, CLIP-I, CLIP-T (``gm.metrics.dreambooth``) of the subject images
    against the instance photos, and the same of the class images against the class images the
    prior was trained on (``class_*``: drift of the class prior)."""

    def __init__(self, clip=None, dino=None, real_class: Sequence = ()):
        self.clip, self.dino, self.real_class = clip, dino, list(real_class)

    def report(self, evaluation: SubjectEvaluation, images: EvaluationImages) -> Dict[str, float]:
        from gm.metrics.dreambooth import dreambooth_metrics

        out: Dict[str, float] = {}
        sets = [("", images.subject, evaluation.subject_prompts, evaluation.real_subject)]
        if self.real_class:
            sets.append(("class_", images.klass, evaluation.class_prompts, self.real_class))
        for prefix, generated, prompts, real in sets:
            clip_gen = self.clip.image_embeds(list(generated)) if self.clip else None
            metrics = dreambooth_metrics(
                prompts, self.dino.image_embeds(list(generated)) if self.dino else None,
                self.dino.image_embeds(real) if self.dino else None, clip_gen,
                self.clip.image_embeds(real) if self.clip else None,
                self.clip.text_embeds(prompts) if self.clip else None)
            out.update({prefix + k: metrics[k] for k in ("dino", "clip_i", "clip_t") if metrics[k] is not None})
        return out


class JudgeMetrics:
    """The toy world's judge (``gm.metrics.toy_world``): subject fidelity, class accuracy and diversity."""

    def __init__(self, judge, class_label: str):
        self.judge, self.class_label = judge, class_label

    def report(self, evaluation: SubjectEvaluation, images: EvaluationImages) -> Dict[str, float]:
        return self.judge.report(images.subject, evaluation.real_subject, images.klass, self.class_label)


class SubjectEvaluation:
    """The subject prompts and the class prompt (``len(subject_prompts)`` images each), sampled in
    batches of ``batch_size`` from fixed seeds, then read by each scorer (``JudgeMetrics``,
    ``PaperMetrics``) against the real subject photos."""

    def __init__(self, scorers: Sequence, real_subject: Sequence, subject_prompts: Sequence[str], class_prompt: str,
                 batch_size: int, options: SamplingOptions):
        self.scorers = list(scorers)
        self.real_subject = list(real_subject)
        self.subject_prompts = list(subject_prompts)
        self.class_prompts = [class_prompt] * len(self.subject_prompts)
        self.batch_size = batch_size
        self.options = options

    def _sample(self, sampler: Sampler, prompts: List[str], seed: int) -> np.ndarray:
        parts = []
        for start in range(0, len(prompts), self.batch_size):
            options = SamplingOptions(**{**self.options.__dict__, "seed": seed + start})
            parts.append(sampler(prompts[start:start + self.batch_size], options))
        return np.concatenate(parts)

    def run(self, sampler: Sampler) -> Tuple[Dict[str, float], EvaluationImages]:
        """Every scorer's numbers (one flat dict) and the images they read."""
        images = EvaluationImages(subject=self._sample(sampler, self.subject_prompts, self.options.seed),
                                  klass=self._sample(sampler, self.class_prompts, self.options.seed + 10_000))
        report: Dict[str, float] = {}
        for scorer in self.scorers:
            report.update(scorer.report(self, images))
        return report, images


def subject_prompts(instance_prompt: str, suffixes: Sequence[str], count: int) -> List[str]:
    """``count`` prompts: the instance prompt + each suffix in turn ("a photo of a sks toy" + " on a beach")."""
    return [f"{instance_prompt} {suffixes[i % len(suffixes)]}".strip() for i in range(count)]


# which number picks the best checkpoint, in order of preference (higher is better)
BEST_BY = ("dino", "clip_i", "subject_fidelity")


def best_metric(report: Dict[str, float]) -> Tuple[str, float] | None:
    """The (name, value) that ranks checkpoints: DINO, else CLIP-I, else the judge's subject fidelity."""
    for name in BEST_BY:
        if report.get(name) is not None:
            return name, float(report[name])
    return None


def before_after_grid(before: EvaluationImages, after: EvaluationImages, path: Path, columns: int = 8) -> None:
    """Rows: subject prompts before, after; class prompt before, after (the first ``columns`` each)."""
    rows = [before.subject[:columns], after.subject[:columns], before.klass[:columns], after.klass[:columns]]
    make_grid(np.concatenate(rows), cols=min(columns, len(rows[0]))).save(path)


def describe(before: Dict[str, float], after: Dict[str, float]) -> str:
    """One log line: each number before -> after."""
    return "; ".join(f"{key} {before[key]:.3f} -> {after[key]:.3f}" for key in after)

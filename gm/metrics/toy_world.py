"""The toy world's judge: recognises classes and the DreamBooth subject without any downloaded model.

Real DreamBooth is judged with DINO/CLIP embeddings (subject fidelity) and by eye (class prior);
neither exists offline, and neither knows the toy world. This judge plays their part for it:
hand-made shape and colour features (gradient-orientation histograms over a grid, i.e. HOG,
plus a colour histogram and an 8x8 colour layout) feed a one-hidden-layer classifier trained
with numpy on freshly drawn photos of the world's classes and of the subject (another seed than
the pretraining photos and the instance photos, so neither was seen). Its heads' probabilities
(label, colour, pattern; :meth:`ToyWorldJudge.embed`) are the embedding for the paper-style set
metrics of :mod:`gm.metrics.similarity`, so cosines compare objects, not backgrounds or poses:

* subject fidelity: mean cosine between generated and real subject photos (the paper's DINO);
* class diversity: 1 - mean cosine between distinct generated class photos (the paper's DIV);
* class accuracy: share of generated "a photo of a <class>" images classified as that class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np

from gm.data.toy_world import CLASSES, COLOURS, PATTERNS
from gm.metrics.similarity import mean_cross_cosine, mean_pairwise_cosine

LABELS: Tuple[str, ...] = CLASSES + ("subject",)
# What else the judge reads off an object: its main colour and its pattern (the subject is a red
# robot striped with yellow). Their probabilities, with the label's, form the judge's embedding.
HEADS: Dict[str, Tuple[str, ...]] = {"label": LABELS, "colour": tuple(sorted(COLOURS)), "pattern": PATTERNS}
SUBJECT_ATTRIBUTES = {"label": "subject", "colour": "red", "pattern": "striped"}
SIZE = 64            # the judge sees every image at 64 x 64
_CELL = 8            # HOG cell (pixels) and orientation bins
_BINS = 9
_COLOUR_LEVELS = 4   # per channel, for the joint colour histogram


def _as_images(images) -> np.ndarray:
    """uint8 (N, 64, 64, 3) from a uint8/float array or a list of PIL images (resized when needed)."""
    from PIL import Image

    if isinstance(images, np.ndarray) and images.shape[1:] == (SIZE, SIZE, 3):
        return images.astype(np.uint8, copy=False)
    out = []
    for image in images:
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
        pil = pil.convert("RGB")
        if pil.size != (SIZE, SIZE):
            pil = pil.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        out.append(np.asarray(pil))
    return np.stack(out)


def _hog(gray: np.ndarray) -> np.ndarray:
    """(N, 64, 64) grey levels -> (N, 7 * 7 * 4 * 9) block-normalised orientation histograms."""
    gx = np.zeros_like(gray)
    gy = np.zeros_like(gray)
    gx[:, :, 1:-1] = gray[:, :, 2:] - gray[:, :, :-2]
    gy[:, 1:-1, :] = gray[:, 2:, :] - gray[:, :-2, :]
    magnitude = np.hypot(gx, gy)
    orientation = np.mod(np.arctan2(gy, gx), np.pi)  # unsigned: a dark-on-light edge = light-on-dark
    bins = np.minimum((orientation / np.pi * _BINS).astype(np.int64), _BINS - 1)
    cells = SIZE // _CELL
    hist = np.zeros((len(gray), cells, cells, _BINS), np.float32)
    for b in range(_BINS):
        weight = np.where(bins == b, magnitude, 0.0).reshape(len(gray), cells, _CELL, cells, _CELL)
        hist[..., b] = weight.sum(axis=(2, 4))
    blocks = np.concatenate([hist[:, :-1, :-1], hist[:, :-1, 1:], hist[:, 1:, :-1], hist[:, 1:, 1:]], axis=-1)
    blocks /= np.sqrt(np.sum(blocks ** 2, axis=-1, keepdims=True) + 1e-6)
    return blocks.reshape(len(gray), -1)


def image_features(images) -> np.ndarray:
    """Shape and colour features (N, F) float32 of images (see the module docstring)."""
    pixels = _as_images(images).astype(np.float32) / 255.0
    parts = []
    for start in range(0, len(pixels), 256):
        chunk = pixels[start:start + 256]
        hog = _hog(chunk.mean(axis=-1))
        levels = np.minimum((chunk * _COLOUR_LEVELS).astype(np.int64), _COLOUR_LEVELS - 1)
        joint = (levels[..., 0] * _COLOUR_LEVELS + levels[..., 1]) * _COLOUR_LEVELS + levels[..., 2]
        colour = np.stack([np.bincount(j.ravel(), minlength=_COLOUR_LEVELS ** 3) for j in joint])
        colour = np.sqrt(colour / joint[0].size)  # Hellinger: a small object's colours still count
        layout = chunk.reshape(len(chunk), 8, SIZE // 8, 8, SIZE // 8, 3).mean(axis=(2, 4)).reshape(len(chunk), -1)
        parts.append(np.concatenate([hog, colour.astype(np.float32), layout], axis=1))
    return np.concatenate(parts).astype(np.float32)


def judge_photos(count_per_label: int, seed: int, size: int = SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """Balanced photos for training/testing the judge: ``count_per_label`` of each world class and of
    the subject, drawn from ``seed``: uint8 (N, size, size, 3) and targets (N, 3), the index of the
    label, colour and pattern in :data:`HEADS`. ``size`` is the world's resolution (the judge reads
    every image at 64 x 64, but a VAE of a 128-pixel world must round-trip them at 128)."""
    from PIL import ImageFilter

    from gm.data.toy_subject import render_toy_photo
    from gm.data.toy_world import render_world_photo

    # Half of the photos are softened: generated images are blurrier than drawn ones, and the judge
    # must not call a soft ball a cup.
    blur_rng = np.random.default_rng([seed, 0xB1])
    images, targets = [], []

    def add(photo, attributes: Dict[str, str]) -> None:
        if blur_rng.random() < 0.5:
            photo = photo.filter(ImageFilter.GaussianBlur(float(blur_rng.uniform(0.4, 1.5)) * size / SIZE))
        images.append(np.asarray(photo))
        targets.append([HEADS[head].index(attributes[head]) for head in HEADS])

    counts = dict.fromkeys(CLASSES, 0)
    index = 0
    while min(counts.values()) < count_per_label:
        photo, item = render_world_photo(index, size=size, seed=seed)
        index += 1
        if counts[item.cls] < count_per_label:
            counts[item.cls] += 1
            add(photo, {"label": item.cls, "colour": item.colour, "pattern": item.pattern})
    for i in range(count_per_label):
        add(render_toy_photo(i, size=size, seed=seed)[0], SUBJECT_ATTRIBUTES)
    return np.stack(images), np.array(targets, np.int64)


def _head_slices() -> Dict[str, slice]:
    out, start = {}, 0
    for head, names in HEADS.items():
        out[head] = slice(start, start + len(names))
        start += len(names)
    return out


def _softmax_heads(logits: np.ndarray) -> np.ndarray:
    out = np.empty_like(logits)
    for part in _head_slices().values():
        z = logits[:, part] - logits[:, part].max(axis=1, keepdims=True)
        e = np.exp(z)
        out[:, part] = e / e.sum(axis=1, keepdims=True)
    return out


@dataclass
class ToyWorldJudge:
    """Standardised features -> ReLU hidden layer -> one softmax per head of :data:`HEADS`."""

    mean: np.ndarray
    std: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    @classmethod
    def fit(cls, images, targets: np.ndarray, *, hidden: int = 256, epochs: int = 30, batch_size: int = 128,
            learning_rate: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0) -> ToyWorldJudge:
        """Train with Adam on the heads' summed softmax cross-entropies (numpy, deterministic for a seed)."""
        feats = image_features(images)
        mean, std = feats.mean(axis=0), feats.std(axis=0) + 1e-3
        x = (feats - mean) / std
        rng = np.random.default_rng(seed)
        slices = list(_head_slices().values())
        n_in, n_out = x.shape[1], slices[-1].stop
        params = [rng.standard_normal((n_in, hidden)).astype(np.float32) * np.sqrt(2.0 / n_in),
                  np.zeros(hidden, np.float32),
                  rng.standard_normal((hidden, n_out)).astype(np.float32) * np.sqrt(1.0 / hidden),
                  np.zeros(n_out, np.float32)]
        moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
        beta1, beta2, t = 0.9, 0.999, 0
        for _ in range(epochs):
            order = rng.permutation(len(x))
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                xb, rows = x[idx], np.arange(len(idx))
                pre = xb @ params[0] + params[1]
                h = np.maximum(pre, 0.0)
                d_logits = _softmax_heads(h @ params[2] + params[3])
                for k, part in enumerate(slices):
                    d_logits[rows, part.start + targets[idx, k]] -= 1.0
                d_logits /= len(idx)
                d_h = (d_logits @ params[2].T) * (pre > 0)
                grads = [xb.T @ d_h, d_h.sum(axis=0), h.T @ d_logits, d_logits.sum(axis=0)]
                t += 1
                for i, (param, grad) in enumerate(zip(params, grads)):
                    m, v = moments[i]
                    m *= beta1
                    m += (1 - beta1) * grad
                    v *= beta2
                    v += (1 - beta2) * grad ** 2
                    step = learning_rate * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + 1e-8)
                    param -= step + learning_rate * weight_decay * param * (i % 2 == 0)
        return cls(mean, std, *params)

    def embed(self, images) -> np.ndarray:
        """What the judge sees in each image: the concatenated probabilities of its heads (N, 18),
        e.g. "subject, red, striped". Cosines of these compare objects, not backgrounds or poses.

        In float64: a float32 matmul's rounding follows the BLAS thread count, and ``1 - cosine``
        (the diversity) magnifies it -- the same images read 1.3e-6 apart (relative) in two processes.
        """
        x = (image_features(images).astype(np.float64) - self.mean) / self.std
        hidden = np.maximum(x @ self.w1.astype(np.float64) + self.b1, 0.0)
        return _softmax_heads(hidden @ self.w2.astype(np.float64) + self.b2)

    def predict(self, images, head: str = "label") -> np.ndarray:
        """The most likely name of ``head`` (label, colour or pattern) for each image."""
        part = _head_slices()[head]
        return np.array([HEADS[head][i] for i in self.embed(images)[:, part].argmax(axis=1)])

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        save_file({name: np.ascontiguousarray(getattr(self, name), np.float32) for name in _FIELDS}, str(path),
                  metadata={"heads": _heads_text(), "size": str(SIZE)})

    @classmethod
    def load(cls, path: str | Path) -> ToyWorldJudge:
        from safetensors import safe_open

        from gm.errors import ConfigError

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no toy-world judge there (tools/pretrain_toy_world.py writes one)")
        with safe_open(str(path), "np") as f:
            heads = (f.metadata() or {}).get("heads", "")
            if heads != _heads_text():
                raise ConfigError(f"{path}: a judge for {heads!r}, this code needs {_heads_text()!r}; "
                                  "retrain it with tools/pretrain_toy_world.py")
            return cls(**{name: f.get_tensor(name) for name in _FIELDS})

    # -- the set metrics ---------------------------------------------------------------------

    def accuracy(self, images, name: str, head: str = "label") -> float:
        """Share of ``images`` whose ``head`` is read as ``name``."""
        return float(np.mean(self.predict(images, head) == name))

    def subject_fidelity(self, generated, real) -> float:
        """Mean cosine over all (generated, real subject photo) embedding pairs (the paper's DINO)."""
        return mean_cross_cosine(self.embed(generated), self.embed(real))

    def diversity(self, images) -> float:
        """1 - mean cosine over distinct pairs of ``images``' embeddings (0: all read alike)."""
        return 1.0 - mean_pairwise_cosine(self.embed(images))

    def report(self, subject_images, real_subject, class_images, class_label: str) -> Dict[str, float]:
        """The numbers a run prints: subject fidelity beside the real photos' own (their mean pairwise
        cosine, the value a perfect generator reaches), the share of subject images recognised, and
        for the class images their accuracy, diversity and the share that read as the subject."""
        return {"subject_fidelity": self.subject_fidelity(subject_images, real_subject),
                "real_subject_fidelity": 1.0 - self.diversity(real_subject),
                "subject_recognised": self.accuracy(subject_images, "subject"),
                "class_accuracy": self.accuracy(class_images, class_label),
                "class_diversity": self.diversity(class_images),
                "class_as_subject": self.accuracy(class_images, "subject")}


def _heads_text() -> str:
    return ";".join(f"{head}:{','.join(names)}" for head, names in HEADS.items())


_FIELDS: Sequence[str] = ("mean", "std", "w1", "b1", "w2", "b2")

"""Set-level embedding similarities, as the DreamBooth paper defines its metrics.

Subject fidelity (the paper's DINO and CLIP-I) is the mean cosine similarity over *all* pairs of
(generated image, real subject image) embeddings; diversity (the paper's DIV) is measured among
the generated images themselves, over distinct pairs only (an image with itself would count 1).
"""

from __future__ import annotations

import numpy as np


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"expected a non-empty (N, D) array of embeddings, got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mean_cross_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity over all pairs (a_i, b_j) of two embedding sets (N, D) and (M, D)."""
    return float(np.mean(_unit_rows(a) @ _unit_rows(b).T))


def mean_pairwise_cosine(a: np.ndarray) -> float:
    """Mean cosine similarity over the distinct pairs (i != j) of one embedding set (N >= 2, D)."""
    unit = _unit_rows(a)
    n = len(unit)
    if n < 2:
        raise ValueError("mean_pairwise_cosine needs at least 2 embeddings")
    sims = unit @ unit.T
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))

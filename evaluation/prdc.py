"""Precision, recall, density and coverage (Naeem et al. 2020).

Shape legend: real (M, D), fake (N, D).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.spatial.distance import cdist

Metric = Literal["euclidean", "cityblock"]


def _kth_nn_radius(x: np.ndarray, k: int, metric: Metric) -> np.ndarray:
    """Return each row's distance to its k-th nearest other row of the same set."""
    d = cdist(x, x, metric)
    # Column 0 after sorting is the point itself (distance 0), so the k-th neighbour is column k.
    return np.sort(d, axis=1)[:, k]


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5, metric: Metric = "euclidean") -> dict:
    """Return ``{precision, recall, density, coverage}`` with k-NN balls of the given metric.

    Strict inequalities, as in the authors' reference code. Block B uses Euclidean k = 5;
    CFGen-style uses L1 (``cityblock``) k = 10.
    """
    real_r = _kth_nn_radius(real, k, metric)
    fake_r = _kth_nn_radius(fake, k, metric)
    d = cdist(real, fake, metric)  # (M, N)
    inside = d < real_r[:, None]  # fake j inside the ball of real i
    precision = inside.any(axis=0).mean()
    recall = (d < fake_r[None, :]).any(axis=1).mean()
    density = inside.sum(axis=0).mean() / k
    coverage = (d.min(axis=1) < real_r).mean()
    return {
        "precision": float(precision),
        "recall": float(recall),
        "density": float(density),
        "coverage": float(coverage),
    }

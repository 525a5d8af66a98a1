"""Per-batch label diversity: Shannon entropy of a batch's labels against random batches.

The loader benchmark (:mod:`atlasldm.bench.loader`) scores one batch at a time; the scale
benchmark (:mod:`atlasldm.bench.scale_sweep`, :mod:`atlasldm.bench.scale_stream`) scores every
batch of an epoch at once with the vectorised forms, which agree batch by batch.
"""

from __future__ import annotations

import numpy as np

RANDOM_DRAWS = 2000  # random batches per batch size for the random-entropy reference


def batch_entropy(codes: np.ndarray) -> float:
    """Shannon entropy (nats) of the label distribution within one batch."""
    counts = np.bincount(codes)
    p = counts[counts > 0] / len(codes)
    return float(-(p * np.log(p)).sum())


def random_entropy(codes: np.ndarray, batch: int, draws: int = 400, seed: int = 0) -> float:
    """Mean per-batch entropy of truly random batches (uniform without replacement)."""
    rng = np.random.default_rng(seed)
    return float(
        np.mean([batch_entropy(rng.choice(codes, batch, replace=False)) for _ in range(draws)])
    )


def batch_entropies(labels: np.ndarray, sizes: np.ndarray, n_labels: int) -> np.ndarray:
    """Shannon entropy (nats) of the labels in each batch; `labels` in emission order.

    Batch i holds labels[sum(sizes[:i]) : sum(sizes[:i+1])]; equals :func:`batch_entropy`
    batch by batch (0 for an empty batch).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    nb = len(sizes)
    if nb == 0:
        return np.zeros(0)
    batch = np.repeat(np.arange(nb, dtype=np.int64), sizes)
    counts = np.bincount(batch * n_labels + labels, minlength=nb * n_labels).reshape(nb, n_labels)
    p = counts / np.maximum(sizes, 1)[:, None]
    return -(p * np.log(np.where(counts > 0, p, 1.0))).sum(axis=1)


class RandomEntropy:
    """Mean per-batch entropy of uniformly random batches (without replacement), by batch size.

    Draws are multivariate-hypergeometric label counts from the population's label counts, the
    same distribution as :func:`random_entropy`'s `rng.choice(codes, b, replace=False)`.
    """

    def __init__(self, label_counts: np.ndarray, draws: int = RANDOM_DRAWS, seed: int = 0):
        self.counts = np.asarray(label_counts, dtype=np.int64)
        self.draws, self.seed = draws, seed
        self._cache: dict[int, float] = {}

    def __call__(self, size: int) -> float:
        """Return the expected entropy of a random batch of `size` cells (nats)."""
        size = int(min(size, self.counts.sum()))
        if size not in self._cache:
            rng = np.random.default_rng([self.seed, size])
            draws = rng.multivariate_hypergeometric(self.counts, size, size=self.draws)
            sizes = np.full(self.draws, size, dtype=np.int64)
            labels = np.repeat(np.tile(np.arange(len(self.counts)), self.draws), draws.ravel())
            self._cache[size] = float(batch_entropies(labels, sizes, len(self.counts)).mean())
        return self._cache[size]

    def ratios(self, entropies: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Per-batch entropy / random entropy of the same size (batches where it is > 0)."""
        ref = np.array([self(s) for s in sizes]) if len(sizes) else np.zeros(0)
        ok = ref > 0
        return np.asarray(entropies)[ok] / ref[ok]


def fmt_or_na(x: float | None) -> str:
    """Format an optional figure to 3 decimals, "n/a" when missing."""
    return "n/a" if x is None else f"{x:.3f}"

"""Shared preprocessing P1-P3: log1p-CP10k, seurat_v3 HVGs, 30-PC projections.

Protocol: docs/evaluation.md, 'Preprocessing'.

Shape legend: N cells, G genes, H selected HVGs, P principal components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA

ProjectionMode = Literal["centred", "uncentered_published"]
LOESS_SPAN = 0.3  # seurat_v3 default span of the mean-variance loess
LOESS_ANCHORS = 256  # evaluation points of the loess surface, interpolated in between


def to_dense(x: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Return a dense float64 copy-or-view of a dense or sparse (N, G) matrix."""
    if sp.issparse(x):
        return np.asarray(x.toarray(), dtype=np.float64)
    return np.asarray(x, dtype=np.float64)


def log1p_cp10k(counts: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Return log1p(counts / library size * 1e4) over the full gene panel, shape (N, G).

    Cells with zero counts stay zero instead of producing NaN.
    """
    x = to_dense(counts)
    lib = x.sum(axis=1, keepdims=True)
    scale = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(x * scale)


def _loess_quadratic(x: np.ndarray, y: np.ndarray, span: float) -> np.ndarray:
    """Return loess fitted values (degree 2, tricube weights, no robustness iterations).

    The surface is evaluated exactly at up to LOESS_ANCHORS quantiles of x and linearly
    interpolated, like skmisc's default ``surface="interpolate"`` (scikit-misc is not a
    dependency, so scanpy's seurat_v3 flavour cannot run; this reimplements it).
    """
    n = len(x)
    k = max(3, int(np.ceil(span * n)))
    anchors = np.unique(np.quantile(x, np.linspace(0.0, 1.0, min(LOESS_ANCHORS, n))))
    fitted = np.empty_like(anchors)
    for i, a in enumerate(anchors):
        d = np.abs(x - a)
        idx = np.argpartition(d, k - 1)[:k]
        dmax = d[idx].max()
        w = (1.0 - np.clip(d[idx] / (dmax if dmax > 0 else 1.0), 0.0, 1.0) ** 3) ** 3
        design = np.stack([np.ones(k), x[idx] - a, (x[idx] - a) ** 2], axis=1)
        sw = np.sqrt(w)[:, None]
        coef, *_ = np.linalg.lstsq(design * sw, y[idx] * sw[:, 0], rcond=None)
        fitted[i] = coef[0]
    return np.interp(x, anchors, fitted)


def seurat_v3_scores(counts: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Return seurat_v3 normalised variances per gene (G,) computed on raw counts.

    Follows scanpy's ``_highly_variable_genes_seurat_v3`` for a single batch: loess of
    log10 variance on log10 mean, values clipped at mean + sqrt(N) * expected sd.
    Constant genes score 0.
    """
    x = to_dense(counts)
    n = x.shape[0]
    mean = x.mean(axis=0)
    var = x.var(axis=0, ddof=1)
    not_const = var > 0
    log_expected = np.zeros(x.shape[1])
    log_expected[not_const] = _loess_quadratic(
        np.log10(mean[not_const]), np.log10(var[not_const]), LOESS_SPAN
    )
    reg_std = np.sqrt(10.0**log_expected)
    clipped = np.minimum(x, reg_std * np.sqrt(n) + mean)
    norm_var = (n * mean**2 + (clipped**2).sum(0) - 2 * clipped.sum(0) * mean) / (
        (n - 1) * reg_std**2
    )
    norm_var[~not_const] = 0.0
    return norm_var


def select_hvgs(counts: np.ndarray | sp.spmatrix, n_top_genes: int) -> np.ndarray:
    """Return indices (H,) of the top seurat_v3 genes, most variable first.

    Ties are broken by gene position (stable sort), so the selection is deterministic.
    """
    scores = seurat_v3_scores(counts)
    n_top = min(n_top_genes, len(scores))
    return np.argsort(-scores, kind="stable")[:n_top]


@dataclass
class Projection:
    """A PCA basis fitted on one set of log1p-CP10k HVG rows."""

    mean: np.ndarray  # (H,) mean of the fitting cells
    components: np.ndarray  # (P, H) loadings

    def project(self, x_hvg: np.ndarray, mode: ProjectionMode = "centred") -> np.ndarray:
        """Return (N, P) coordinates; ``uncentered_published`` skips the mean subtraction."""
        if mode == "centred":
            return (x_hvg - self.mean) @ self.components.T
        if mode == "uncentered_published":
            return x_hvg @ self.components.T
        raise ValueError(f"unknown projection mode {mode!r}")


def fit_projection(x_hvg: np.ndarray, n_pcs: int = 30, seed: int = 0) -> Projection:
    """Return a PCA projection (arpack, ``random_state=seed``) fitted on (N, H) rows."""
    n_comp = min(n_pcs, x_hvg.shape[0] - 1, x_hvg.shape[1] - 1)
    pca = PCA(n_components=n_comp, svd_solver="arpack", random_state=seed).fit(x_hvg)
    return Projection(mean=pca.mean_.copy(), components=pca.components_.copy())


@dataclass
class Representation:
    """P1-P3 fitted on the reference cells: the HVG list and the reference PCA."""

    hvg_idx: np.ndarray  # (H,) gene indices, most variable first
    projection: Projection

    def genes_to_hvg(self, log_x: np.ndarray) -> np.ndarray:
        """Return the (N, H) HVG columns of log1p-CP10k rows."""
        return log_x[:, self.hvg_idx]

    def pcs(self, log_x: np.ndarray) -> np.ndarray:
        """Return (N, P) centred reference-PCA coordinates of log1p-CP10k rows."""
        return self.projection.project(self.genes_to_hvg(log_x), "centred")


def fit_representation(
    ref_counts: np.ndarray | sp.spmatrix, n_top_genes: int = 2000, n_pcs: int = 30, seed: int = 0
) -> Representation:
    """Return HVGs (seurat_v3 on reference counts) and a PCA fitted on reference log1p-CP10k."""
    hvg_idx = select_hvgs(ref_counts, n_top_genes)
    ref_log = log1p_cp10k(ref_counts)
    return Representation(hvg_idx, fit_projection(ref_log[:, hvg_idx], n_pcs, seed))

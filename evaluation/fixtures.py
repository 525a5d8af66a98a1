"""Offline pbmc68k fixture, stratified split helpers and the known-bad generators.

See docs/evaluation.md, 'Offline fixture' and 'Floors and known-bad sets'.

Shape legend: N cells, G genes. Counts are float arrays holding integers.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

from atlasldm.evaluation.preprocess import to_dense

PBMC_LABEL_KEY = "bulk_labels"


def load_pbmc68k() -> ad.AnnData:
    """Return scanpy's bundled pbmc68k_reduced (700 × 765) with raw integer counts in X.

    ``.raw`` holds log1p-CP10k computed with whole-transcriptome library sizes, so counts
    are recovered exactly as round(expm1(raw.X) · n_counts / 1e4).
    """
    src = sc.datasets.pbmc68k_reduced()
    log_x = to_dense(src.raw.X)
    counts = np.round(np.expm1(log_x) * src.obs["n_counts"].to_numpy()[:, None] / 1e4)
    obs = src.obs[[PBMC_LABEL_KEY, "louvain", "phase"]].copy()
    obs[PBMC_LABEL_KEY] = obs[PBMC_LABEL_KEY].astype(str)
    out = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs)
    out.var_names = src.raw.var_names.copy()
    return out


def stratified_split(
    labels: np.ndarray, frac: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted index arrays (A, B) with round(frac · n_c) cells of every class c in A."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    a_idx: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a_idx.append(idx[: int(round(frac * len(idx)))])
    a = np.sort(np.concatenate(a_idx))
    return a, np.setdiff1d(np.arange(len(labels)), a)


def carve_floor(
    train_labels: np.ndarray, test_labels: np.ndarray, seed: int = 0, max_frac: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Return (floor, reference) indices into the training split (P0).

    The floor has the test set's class composition and size, shrunk uniformly when that
    would take more than ``max_frac`` of the training cells (so a reference remains to fit
    on); every class keeps at least one reference cell.
    """
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    scale = min(1.0, max_frac * len(train_labels) / max(len(test_labels), 1))
    rng = np.random.default_rng(seed)
    floor: list[np.ndarray] = []
    for c in np.unique(test_labels):
        idx = rng.permutation(np.flatnonzero(train_labels == c))
        want = int(round(scale * np.sum(test_labels == c)))
        floor.append(idx[: max(0, min(want, len(idx) - 1))])
    floor_idx = np.sort(np.concatenate(floor)) if floor else np.array([], int)
    return floor_idx, np.setdiff1d(np.arange(len(train_labels)), floor_idx)


def pbmc68k_splits(test_frac: float = 1 / 3, seed: int = 0) -> dict[str, ad.AnnData]:
    """Return ``{test, floor, reference}`` AnnData views of the fixture (stratified).

    With the default 1/3, the floor gets exactly the test set's size and composition and
    the reference keeps the remaining third; a 50/50 test split would leave no reference
    once a test-sized floor is carved out.
    """
    full = load_pbmc68k()
    labels = full.obs[PBMC_LABEL_KEY].to_numpy()
    test_idx, train_idx = stratified_split(labels, test_frac, seed)
    train = full[train_idx].copy()
    floor_idx, ref_idx = carve_floor(train.obs[PBMC_LABEL_KEY].to_numpy(), labels[test_idx], seed)
    return {
        "test": full[test_idx].copy(),
        "floor": train[floor_idx].copy(),
        "reference": train[ref_idx].copy(),
    }


def poisson_mean_counts(
    ref_counts: np.ndarray | sp.spmatrix,
    ref_labels: np.ndarray,
    target_labels: np.ndarray,
    target_libsize: np.ndarray,
    seed: int = 0,
) -> np.ndarray:
    """Return (N, G) Poisson counts around each class's mean profile × the target library size.

    The profile of class c is the mean over reference cells of c of counts / library size;
    classes absent from the reference use the global profile.
    """
    x = to_dense(ref_counts)
    frac = x / np.maximum(x.sum(1, keepdims=True), 1.0)
    ref_labels, target_labels = np.asarray(ref_labels), np.asarray(target_labels)
    global_profile = frac.mean(0)
    profiles = {c: frac[ref_labels == c].mean(0) for c in np.unique(ref_labels)}
    lam = np.stack([profiles.get(c, global_profile) for c in target_labels])
    lam *= np.asarray(target_libsize, dtype=np.float64)[:, None]
    return np.random.default_rng(seed).poisson(lam).astype(np.float64)


def gene_shuffled_counts(counts: np.ndarray | sp.spmatrix, seed: int = 0) -> np.ndarray:
    """Return a copy of (N, G) counts with every gene column permuted independently.

    Per-gene marginals are kept exactly; co-expression and cell identity are destroyed.
    """
    x = to_dense(counts).copy()
    rng = np.random.default_rng(seed)
    for j in range(x.shape[1]):
        x[:, j] = x[rng.permutation(x.shape[0]), j]
    return x

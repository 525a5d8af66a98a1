"""What every evaluated set shares: the run's settings, a set's cells and the fitted context.

`EvalConfig` is written into report.json; `Context` is fitted once on the reference and the
real test set (docs/evaluation.md, P0-P3) and used by every metric block. Shape legend: N cells,
G genes, P PCs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.pipeline import Pipeline

from atlasldm.evaluation.preprocess import Projection, Representation


@dataclass
class EvalConfig:
    """Settings of one evaluation run; all are written into report.json."""

    label_key: str = "cell_type"  # obs column holding the conditioning label
    n_top_genes: int = 2000  # seurat_v3 HVGs on reference counts (capped at the gene count)
    n_pcs: int = 30  # PCA components for Block B and CFGen-style metrics
    mmd_n_global: int = 2000  # fixed n per side for global unbiased MMD² and energy
    mmd_n_class: int = 500  # per-class cap of that fixed n
    min_class_cells: int = 20  # classes with fewer cells on either side are skipped
    max_class_cells: int = 3000  # CFGen-style per-class subsample cap
    seed: int = 0  # seed of HVG ties, PCA, subsampling and classifier splits
    rf_trees: int = 1000  # scDiffusion RF AUC forest size
    block_a: bool = True  # also compute the paper-compatible recipes
    known_bad: bool = True  # add Poisson-mean and gene-shuffled references
    known_bad_seeds: tuple[int, ...] = (0, 1, 2)  # seeds of the known-bad generators


@dataclass
class EvalSet:
    """One evaluated set of cells at one seed, in log1p-CP10k over the aligned genes."""

    log: np.ndarray  # (N, G) log1p-CP10k
    labels: np.ndarray  # (N,) conditioning labels as strings
    libsize: np.ndarray | None = None  # (N,) raw library sizes; None for normalised input
    interp_alpha: np.ndarray | None = None  # (N,) interpolation position, when generated so


@dataclass
class Context:
    """Everything fitted once on the reference and the test set, shared by all sets."""

    config: EvalConfig
    rep: Representation
    test: EvalSet
    test_pcs: np.ndarray  # (N_test, P) centred reference-PCA coordinates
    bandwidth: float  # median pairwise distance among reference cells in PC space
    classifier: Pipeline  # label classifier trained on reference PCs
    test_projection: Projection | None  # CFGen-style PCA fitted on the real test HVGs
    settings: dict = field(default_factory=dict)

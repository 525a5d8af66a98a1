"""What every cell source of the stream shares: the read piece and the selection rule."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atlasldm.data.csr import Csr
from atlasldm.data.split import split_mask


@dataclass
class Piece:
    """CSR rows of the sorted joinids `joinids`, tokens already mapped."""

    joinids: np.ndarray  # int64 (n,), sorted
    csr: Csr  # n rows
    library_size: np.ndarray | None  # float32 (n,), all source genes (direct mode), else None
    dropped_nnz: int  # entries of genes outside the vocabulary (direct mode, unknown=drop)


def selection_mask(
    n: int,
    nnz: np.ndarray | None,
    key_hashes: np.ndarray | None,
    min_genes: int,
    split: str,
    seed: int,
    fraction: float,
) -> np.ndarray:
    """Which of `n` candidates have >= `min_genes` genes (when nnz is known) and are in `split`.

    `key_hashes` (uint64 split-key hashes) is needed unless `split` is "all".
    """
    mask = np.ones(n, dtype=bool)
    if nnz is not None and min_genes > 0:
        mask &= nnz >= min_genes
    if split != "all":
        mask &= split_mask(key_hashes, seed, fraction, split)
    return mask

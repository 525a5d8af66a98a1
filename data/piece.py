"""What the cell sources of the stream share: the read piece and the selection rule.

Also the steps every direct source (a SOMA experiment or an h5ad file) takes the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atlasldm.data.csr import Csr, drop_zero_tokens, row_sums
from atlasldm.data.split import hash_int_keys, split_mask
from atlasldm.data.vocab import GeneVocab


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


def direct_keep(min_genes: int, split: str, seed: int, fraction: float):
    """A direct source's keep rule for `fold_obs`: min_genes, then the split.

    The split hashes the joinids when no split-key hashes come with the table.
    """

    def keep(ids: np.ndarray, nnz: np.ndarray | None, hashes: np.ndarray | None) -> np.ndarray:
        if split != "all" and hashes is None:  # split by joinid
            hashes = hash_int_keys(ids)
        return selection_mask(len(ids), nnz, hashes, min_genes, split, seed, fraction)

    return keep


def source_tokens(
    vocab: GeneVocab, feature_ids: list[str], unknown_genes: str, where: str
) -> tuple[list[int], int]:
    """(token per source gene, 0 outside the vocabulary; genes dropped).

    An unknown gene with unknown_genes=error is one line naming the source and the config key.
    """
    try:
        return vocab.token_lookup(feature_ids, unknown_genes)
    except ValueError as err:
        raise ValueError(f"{where}: {err} (config key unknown_genes=drop)") from err


def direct_piece(joinids: np.ndarray, csr: Csr) -> Piece:
    """The piece of rows read over all source genes, genes outside the vocabulary dropped.

    Library sizes are summed before the drop, so they count every gene of the source.
    """
    library = row_sums(csr)
    csr, dropped = drop_zero_tokens(csr)
    return Piece(joinids, csr, library, dropped)

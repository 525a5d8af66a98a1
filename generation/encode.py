"""Encode real cells of an AnnData with the VAE (start points of trajectories from real cells)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from atlasldm.generation.vocabulary import ConditionError
from atlasldm.models.batch import CellBatch
from atlasldm.models.vae import VAE


def vocabulary_tokens(var_names: pd.Index, genes: pd.DataFrame) -> np.ndarray:
    """Return the token (1..V) of each var name, matched by feature_id, else feature_name.

    Raises:
        ConditionError: names that are in neither column (names the first few and the fix).
    """
    by_id = dict(zip(genes["feature_id"], genes["token"].astype(int), strict=True))
    by_name = dict(zip(genes["feature_name"], genes["token"].astype(int), strict=True))
    lookup = (
        by_id
        if sum(n in by_id for n in var_names) >= sum(n in by_name for n in var_names)
        else by_name
    )
    unknown = [n for n in var_names if n not in lookup]
    if unknown:
        raise ConditionError(
            f"{len(unknown)} genes of the source cells are not in the VAE vocabulary (e.g. "
            f"{unknown[:5]}); subset the AnnData to the export's genes.tsv first"
        )
    return np.array([lookup[n] for n in var_names], dtype=np.int64)


@torch.no_grad()
def encode_cells(vae: VAE, adata, genes: pd.DataFrame, device: torch.device) -> torch.Tensor:
    """Return posterior means z (N, M, D) of the cells of `adata` (raw counts in X)."""
    tokens = vocabulary_tokens(adata.var_names, genes)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    if X.nnz and (not np.all(np.isfinite(X.data)) or X.data.min() < 0):
        raise ConditionError("the source cells hold negative or NaN counts; X must be raw counts")
    X.eliminate_zeros()
    batch = CellBatch.from_packed(
        torch.from_numpy(tokens[X.indices]).to(device),
        torch.from_numpy(X.data).to(device),
        torch.from_numpy(X.indptr.astype(np.int32)).to(device),
        torch.from_numpy(np.asarray(X.sum(axis=1), dtype=np.float32).ravel()).to(device),
    )
    return vae.encode(batch).float()

"""Encode real cells of an AnnData with the VAE, in batches (the API's `encode`, and the start
points of trajectories from real cells)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from atlasldm.generation.vocabulary import ConditionError
from atlasldm.models.batch import CellBatch
from atlasldm.models.vae import VAE
from atlasldm.progress import Progress


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


ENCODE_BATCH = 1024  # cells per encoder call: bounds memory whatever the AnnData's size


def row_blocks(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Return [start, stop) row ranges of at most `batch_size` rows covering 0..n."""
    if batch_size < 1:
        raise ConditionError(f"batch_size must be >= 1, got {batch_size}")
    return [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]


def _counts(adata, lo: int, hi: int, layer: str | None) -> sp.csr_matrix:
    """Rows lo..hi of X (or `layer`) as float32 CSR; works on backed AnnData too."""
    X = adata.X if layer is None else adata.layers[layer]
    X = sp.csr_matrix(X[lo:hi], dtype=np.float32)
    if X.nnz and (not np.all(np.isfinite(X.data)) or X.data.min() < 0):
        raise ConditionError("the source cells hold negative or NaN counts; X must be raw counts")
    X.eliminate_zeros()
    return X


@torch.no_grad()
def _encode_block(vae: VAE, X: sp.csr_matrix, tokens: np.ndarray, device) -> torch.Tensor:
    batch = CellBatch.from_packed(
        torch.from_numpy(tokens[X.indices]).to(device),
        torch.from_numpy(X.data).to(device),
        torch.from_numpy(X.indptr.astype(np.int32)).to(device),
        torch.from_numpy(np.asarray(X.sum(axis=1), dtype=np.float32).ravel()).to(device),
    )
    return vae.encode(batch).float()


def encode_cells(
    vae: VAE,
    adata,
    genes: pd.DataFrame,
    device: torch.device,
    batch_size: int = ENCODE_BATCH,
    layer: str | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Return posterior means z (N, M, D) of the cells of `adata` (raw counts in X or `layer`).

    Cells are encoded `batch_size` at a time, so memory is bounded by one batch (plus the
    (N, M, D) result); the encoder sees each cell on its own, so batching does not change z.
    """
    tokens = vocabulary_tokens(adata.var_names, genes)
    out = []
    for lo, hi in row_blocks(adata.n_obs, batch_size):
        out.append(_encode_block(vae, _counts(adata, lo, hi, layer), tokens, device))
        if progress is not None:
            progress.update(hi - lo)
    if not out:
        m, d = vae.config.num_latent_tokens, vae.config.latent_dim
        return torch.zeros(0, m, d, device=device)
    return torch.cat(out)

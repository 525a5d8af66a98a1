"""scanpy's bundled pbmc68k_reduced with its integer UMI counts recovered (no network needed).

The file (700 cells x 765 genes, 10x "Fresh 68k PBMCs (Donor A)") stores log1p-CP10k in `.raw.X`,
computed with whole-transcriptome library sizes `obs["n_counts"]`, so the counts are recovered
exactly as `round(expm1(raw.X) * n_counts / 1e4)`.

The file has gene symbols only, no Ensembl ids, so `feature_id` is the gene symbol here (unique in
this file). Vocabularies built from this source therefore do not match Census Ensembl ids.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger(__name__)

MAX_INTEGER_DEVIATION = 0.1  # largest tolerated distance from an integer before rounding
PBMC_CONSTANTS = {
    "dataset_id": "pbmc68k",
    "donor_id": "donorA",
    "assay": "10x 3' v1",
    "tissue": "blood",
}


def pbmc68k_counts():
    """AnnData of pbmc68k_reduced with integer counts (float32 CSR) in X and Census-style obs/var.

    obs: cell_type (from bulk_labels), dataset_id, donor_id, assay, tissue, is_primary_data, plus
    the original n_counts, louvain and phase; var: feature_id = feature_name = gene symbol.
    """
    import anndata as ad

    src = _read_bundled()
    logx = sp.csr_matrix(src.raw.X, dtype=np.float64)
    n_counts = src.obs["n_counts"].to_numpy(dtype=np.float64)
    vals = np.expm1(logx.data) * np.repeat(n_counts, np.diff(logx.indptr)) / 1e4
    deviation = float(np.abs(vals - np.round(vals)).max()) if vals.size else 0.0
    if deviation >= MAX_INTEGER_DEVIATION:
        raise ValueError(
            f"pbmc68k count recovery failed: max deviation from an integer is {deviation:.3f} "
            f"(>= {MAX_INTEGER_DEVIATION}); the bundled scanpy file changed"
        )
    counts = sp.csr_matrix(
        (np.round(vals).astype(np.float32), logx.indices, logx.indptr), logx.shape
    )
    counts.eliminate_zeros()
    obs = pd.DataFrame(index=pd.Index(src.obs_names.astype(str), name="obs_id"))
    obs["cell_type"] = src.obs["bulk_labels"].astype(str).to_numpy()
    for key, value in PBMC_CONSTANTS.items():
        obs[key] = value
    obs["is_primary_data"] = True
    obs["n_counts"] = src.obs["n_counts"].to_numpy(dtype=np.float32)
    obs["louvain"] = src.obs["louvain"].astype(str).to_numpy()
    obs["phase"] = src.obs["phase"].astype(str).to_numpy()
    symbols = src.raw.var_names.astype(str)
    var = pd.DataFrame(
        {"feature_id": symbols.to_numpy(), "feature_name": symbols.to_numpy()},
        index=pd.Index(symbols, name="var_id"),
    )
    logger.info("pbmc68k: recovered counts, max deviation from integer %.4f", deviation)
    return ad.AnnData(X=counts, obs=obs, var=var)


def _read_bundled():
    """`sc.datasets.pbmc68k_reduced()`, read from scanpy's package folder without importing
    scanpy (its import costs seconds); falls back to the scanpy call if the file moved."""
    import importlib.util

    import anndata as ad

    spec = importlib.util.find_spec("scanpy")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "10x_pbmc68k_reduced.h5ad"
        if path.is_file():
            with warnings.catch_warnings():  # an old-format file: anndata warns on load
                warnings.filterwarnings("ignore", module="anndata")
                return ad.read_h5ad(path)
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


def write_pbmc_experiment(uri: str | Path) -> str:
    """Write (or reuse) pbmc68k counts as a SOMA experiment (X layer "raw", measurement "RNA")."""
    import tiledbsoma.io

    uri = Path(uri)
    marker = uri.with_name(uri.name + ".complete.json")
    if marker.is_file():
        return str(uri)
    if uri.exists():
        shutil.rmtree(uri)
    uri.parent.mkdir(parents=True, exist_ok=True)
    tiledbsoma.io.from_anndata(
        str(uri), pbmc68k_counts(), measurement_name="RNA", X_layer_name="raw"
    )
    marker.write_text(json.dumps({"source": "builtin:pbmc68k"}))
    return str(uri)

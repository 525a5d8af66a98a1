"""Output of a generation run: an .h5ad file or a SOMA Experiment, both written atomically.

Every batch becomes a `Part` (its plan rows, counts, means, latents). The h5ad writer assembles
the parts in plan order and renames a finished temporary file into place; the SOMA writer streams
each part into arrays created up front (bounded memory) inside a temporary folder that is renamed
when complete. Either way a crash leaves no output that looks finished.

Shape legend: B cells of a part, G genes, N planned cells, L = M·D flattened latent width.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from atlasldm.generation.plan import Plan

MEANS_LAYER = "means"  # decoded NB means μ
LATENT_KEY = "latent"  # obsm key of the flattened latents z (VAE space)


@dataclass
class Part:
    """One generated batch."""

    rows: np.ndarray  # (B,) plan row indices
    counts: sp.csr_matrix  # (B, G) float32 integer counts (or log1p-CP10k, Gaussian VAE)
    means: np.ndarray | None  # (B, G) float32 decoded means
    latents: np.ndarray  # (B, L) float32


def obs_frame(plan: Plan, rows: np.ndarray) -> pd.DataFrame:
    """Return obs of plan rows: conditions, library_size, seed, interp_* and matched names."""
    obs = pd.DataFrame(index=pd.Index([f"gen{i}" for i in rows], name="obs_id"))
    for attr, values in plan.values.items():
        obs[attr] = values[rows].astype(str)
    obs["library_size"] = plan.library_size[rows]
    obs["seed"] = plan.seed[rows]
    if plan.interp_alpha is not None:
        attr, a, b = plan.interp
        obs["interp_alpha"] = plan.interp_alpha[rows]
        obs["interp_from"], obs["interp_to"] = a, b
    for key, values in plan.extra_obs.items():
        obs[key] = values[rows].astype(str)
    return obs


def var_frame(genes: pd.DataFrame) -> pd.DataFrame:
    """Return var indexed by feature_id with feature_name, in vocabulary (token) order."""
    var = pd.DataFrame({"feature_name": genes["feature_name"].to_numpy()})
    var.index = pd.Index(genes["feature_id"].to_numpy(), name="feature_id")
    return var


def _categorical(obs: pd.DataFrame, plan: Plan) -> pd.DataFrame:
    for attr in plan.values:
        obs[attr] = obs[attr].astype("category")
    return obs


def assemble(parts: list[Part], plan: Plan, genes: pd.DataFrame, uns: dict) -> ad.AnnData:
    """Return the AnnData of `parts` in plan-row order."""
    parts = sorted(parts, key=lambda p: int(p.rows[0]))
    rows = np.concatenate([p.rows for p in parts])
    adata = ad.AnnData(
        X=sp.vstack([p.counts for p in parts], format="csr").astype(np.float32),
        obs=_categorical(obs_frame(plan, rows), plan),
        var=var_frame(genes),
    )
    if all(p.means is not None for p in parts):
        adata.layers[MEANS_LAYER] = np.concatenate([p.means for p in parts])
    adata.obsm[LATENT_KEY] = np.concatenate([p.latents for p in parts])
    adata.uns["generation"] = json.dumps(uns, default=str)
    adata.uns["generated_is_normalized"] = bool(uns.get("generated_is_normalized", False))
    return adata


def write_h5ad_atomic(adata: ad.AnnData, path: Path) -> Path:
    """Write `adata` to a temporary sibling, fsync it, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        adata.write_h5ad(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def tmp_soma_uri(out: Path) -> Path:
    """Temporary folder a SOMA output is built in before the rename."""
    return out.with_name(f".{out.name}.tmp")


def create_soma(out: Path, plan: Plan, genes: pd.DataFrame, latent_width: int, means: bool):
    """Create the empty experiment (obs schema, var, X/counts[, X/means], obsm/latent)."""
    import tiledbsoma

    uri = tmp_soma_uri(out)
    shutil.rmtree(uri, ignore_errors=True)
    n, g = plan.num_cells, len(genes)
    probe = obs_frame(plan, np.arange(min(1, n)))
    fields = [pa.field("soma_joinid", pa.int64()), pa.field("obs_id", pa.large_string())]
    for col, dtype in probe.dtypes.items():
        kind = pa.from_numpy_dtype(dtype) if dtype.kind in "biuf" else pa.large_string()
        fields.append(pa.field(str(col), kind))
    text = pa.large_string()
    var_schema = pa.schema(
        [("soma_joinid", pa.int64()), ("feature_id", text), ("feature_name", text)]
    )
    with tiledbsoma.Experiment.create(str(uri)) as exp:
        exp.add_new_dataframe("obs", schema=pa.schema(fields), domain=[(0, n - 1)])
        rna = exp.add_new_collection("ms").add_new_collection("RNA", tiledbsoma.Measurement)
        var = rna.add_new_dataframe("var", schema=var_schema, domain=[(0, g - 1)])
        columns = {
            "soma_joinid": np.arange(g, dtype=np.int64),
            "feature_id": genes["feature_id"].to_numpy().astype(str),
            "feature_name": genes["feature_name"].to_numpy().astype(str),
        }
        var.write(pa.table(columns))
        xs = rna.add_new_collection("X")
        xs.add_new_sparse_ndarray("counts", type=pa.float32(), shape=(n, g))
        if means:
            xs.add_new_dense_ndarray(MEANS_LAYER, type=pa.float32(), shape=(n, g))
        obsm = rna.add_new_collection("obsm")
        obsm.add_new_dense_ndarray(LATENT_KEY, type=pa.float32(), shape=(n, latent_width))


def write_soma_part(out: Path, plan: Plan, part: Part) -> None:
    """Write one part's rows into the temporary experiment (parts may come from any rank)."""
    import tiledbsoma

    rows = part.rows.astype(np.int64)
    lo, hi = int(rows[0]), int(rows[-1]) + 1  # parts are contiguous plan rows
    obs = obs_frame(plan, rows).reset_index()
    obs.insert(0, "soma_joinid", rows)
    coo = part.counts.tocoo()
    with tiledbsoma.Experiment.open(str(tmp_soma_uri(out)), mode="w") as exp:
        exp.obs.write(pa.Table.from_pandas(obs, schema=exp.obs.schema, preserve_index=False))
        rna = exp.ms["RNA"]
        counts = {
            "soma_dim_0": rows[coo.row],
            "soma_dim_1": coo.col.astype(np.int64),
            "soma_data": coo.data.astype(np.float32),
        }
        rna.X["counts"].write(pa.table(counts))
        if part.means is not None and MEANS_LAYER in rna.X:
            rna.X[MEANS_LAYER].write(
                (slice(lo, hi - 1), slice(None)), pa.Tensor.from_numpy(part.means)
            )
        rna.obsm[LATENT_KEY].write(
            (slice(lo, hi - 1), slice(None)), pa.Tensor.from_numpy(part.latents)
        )


def finish_soma(out: Path, uns: dict) -> Path:
    """Record the settings and rename the finished experiment into place."""
    uri = tmp_soma_uri(out)
    (uri / "generation.json").write_text(json.dumps(uns, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    os.replace(uri, out)
    return out

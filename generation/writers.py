"""Output of a generation run: an .h5ad file or a SOMA Experiment, both written atomically.

Every batch becomes a `Part` (its plan rows, counts, means, latents). The h5ad writer assembles
the parts in plan order and renames a finished temporary file into place; the SOMA writer streams
each part into arrays created up front (bounded memory) inside a temporary folder that is renamed
when complete. Either way a crash leaves no output that looks finished.

The SOMA output has the CELLxGENE Census layout (counts in X `raw`, var `feature_id` /
`feature_name`), and `tiledbsoma.io.to_anndata(exp, "RNA")` with no other argument returns the
same AnnData as the .h5ad: X `data` is a second name of the `raw` array (to_anndata's default X
layer), the obs and var index columns are recorded as tiledbsoma.io records them, and the
settings are in `ms/RNA/uns` in tiledbsoma.io's uns layout (see `docs/contracts.md` §4).

Shape legend: B cells of a part, G genes, N planned cells, L = M·D flattened latent width.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from atlasldm.generation.plan import Plan

COUNTS_LAYER = "raw"  # X layer of the counts, as in the Census and our training copies
DEFAULT_LAYER = "data"  # X layer tiledbsoma.io.to_anndata reads when given no X_layer_name
MEANS_LAYER = "means"  # decoded NB means μ
LATENT_KEY = "latent"  # obsm key of the flattened latents z (VAE space)
SETTINGS_KEY = "generation"  # uns key of the run's settings (a dict)
# Metadata key by which tiledbsoma.io.to_anndata finds the column to index obs/var by when no
# obs_id_name / var_id_name is passed (tiledbsoma.io.from_anndata writes it the same way).
INDEX_NAME_KEY = "soma_dataframe_original_index_name"
# tiledbsoma.io's uns layout keeps a list of strings as a dataframe with this hint and column.
UNS_HINT_KEY, UNS_HINT_1D, UNS_VALUES = "soma_uns_outgest_hint", "array_1d", "values"


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
    adata.uns[SETTINGS_KEY] = settings_tree(uns)
    adata.uns["generated_is_normalized"] = bool(uns.get("generated_is_normalized", False))
    return adata


def settings_tree(value: Any) -> Any:
    """`value` in a form both .h5ad and SOMA store and read back as the same dict.

    Mappings become dicts with string keys; lists of numbers or of strings stay lists (read back
    as numpy arrays); other lists become dicts keyed "0", "1", ...; numpy scalars become Python
    scalars and other objects (paths) their text. None values and empty lists are left out: the
    SOMA uns layout cannot hold them, and a missing key reads as "not set" in both formats.
    """
    if isinstance(value, Mapping):
        tree = {str(k): settings_tree(v) for k, v in value.items()}
        return {k: v for k, v in tree.items() if v is not None and not _empty_list(v)}
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        items = [settings_tree(v) for v in value if v is not None]
        if all(_is_number(v) for v in items) or all(isinstance(v, str) for v in items):
            return items
        return {str(i): v for i, v in enumerate(items) if not _empty_list(v)}
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _empty_list(value: Any) -> bool:
    return isinstance(value, list) and not value


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
    """Create the empty experiment (obs schema, var, X/raw = X/data[, X/means], obsm/latent)."""
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
        obs = exp.add_new_dataframe("obs", schema=pa.schema(fields), domain=[(0, n - 1)])
        obs.metadata[INDEX_NAME_KEY] = json.dumps("obs_id")
        rna = exp.add_new_collection("ms").add_new_collection("RNA", tiledbsoma.Measurement)
        var = rna.add_new_dataframe("var", schema=var_schema, domain=[(0, g - 1)])
        var.metadata[INDEX_NAME_KEY] = json.dumps("feature_id")
        columns = {
            "soma_joinid": np.arange(g, dtype=np.int64),
            "feature_id": genes["feature_id"].to_numpy().astype(str),
            "feature_name": genes["feature_name"].to_numpy().astype(str),
        }
        var.write(pa.table(columns))
        xs = rna.add_new_collection("X")
        counts = xs.add_new_sparse_ndarray(COUNTS_LAYER, type=pa.float32(), shape=(n, g))
        xs.set(DEFAULT_LAYER, counts, use_relative_uri=True)  # one array, two names: no copy
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
        rna.X[COUNTS_LAYER].write(pa.table(counts))
        if part.means is not None and MEANS_LAYER in rna.X:
            rna.X[MEANS_LAYER].write(
                (slice(lo, hi - 1), slice(None)), pa.Tensor.from_numpy(part.means)
            )
        rna.obsm[LATENT_KEY].write(
            (slice(lo, hi - 1), slice(None)), pa.Tensor.from_numpy(part.latents)
        )


def finish_soma(out: Path, uns: dict) -> Path:
    """Record the settings and rename the finished experiment into place.

    The settings go to `ms/RNA/uns` (read back by `tiledbsoma.io.to_anndata` as
    `uns["generation"]`, a dict) and, as before, to `generation.json` in the folder.
    """
    import tiledbsoma

    uri = tmp_soma_uri(out)
    (uri / "generation.json").write_text(json.dumps(uns, indent=2, default=str))
    with tiledbsoma.Experiment.open(str(uri), mode="w") as exp:
        rna_uns = exp.ms["RNA"].add_new_collection("uns")
        write_uns(rna_uns, {SETTINGS_KEY: settings_tree(uns)})
        rna_uns.metadata["generated_is_normalized"] = bool(
            uns.get("generated_is_normalized", False)
        )
    if out.exists():
        shutil.rmtree(out)
    os.replace(uri, out)
    return out


def write_uns(coll: Any, tree: dict) -> None:
    """Write a `settings_tree` into a SOMA collection in tiledbsoma.io's uns layout.

    Scalars are metadata of the collection, dicts sub-collections, lists of numbers dense
    arrays and lists of strings dataframes with tiledbsoma.io's outgest hint.
    """
    for key, value in tree.items():
        if isinstance(value, dict):
            write_uns(coll.add_new_collection(key), value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            schema = pa.schema([("soma_joinid", pa.int64()), (UNS_VALUES, pa.large_string())])
            frame = coll.add_new_dataframe(key, schema=schema, domain=[(0, len(value) - 1)])
            frame.write(pa.table({"soma_joinid": np.arange(len(value)), UNS_VALUES: value}))
            frame.metadata[UNS_HINT_KEY] = UNS_HINT_1D
        elif isinstance(value, list):
            array = np.asarray(value)
            dense = coll.add_new_dense_ndarray(
                key, type=pa.from_numpy_dtype(array.dtype), shape=array.shape
            )
            dense.write((slice(None),), pa.Tensor.from_numpy(array))
        else:
            coll.metadata[key] = value

"""Synthetic negative-binomial single-cell data, written as a Census-layout SOMA experiment.

Model: every cell type has a gene program (log-normal gene means with a few up-regulated marker
genes), every dataset a multiplicative batch shift per gene and a library-size factor; library
sizes are log-normal; counts are NB(mean = library * p_gene, dispersion r_gene).

Cells are generated in fixed blocks of `GEN_BLOCK` cells, each from its own Generator seeded by
(seed, block), so any block can be regenerated alone and output never depends on write batching.
Dataset blocks are stored contiguously, as in Census. Memory is bounded by a few write chunks.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma

from atlasldm.progress import Progress

logger = logging.getLogger(__name__)

GEN_BLOCK = 1024  # cells per generator block; part of the data definition, do not change
OBS_STRING_COLUMNS = ("dataset_id", "assay", "cell_type", "donor_id", "tissue", "tissue_general")


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of a synthetic data set; `parse_spec` reads them from `k=v,...` strings."""

    cells: int = 3000  # number of cells N
    genes: int = 300  # number of genes G
    datasets: int = 5  # number of contiguous dataset_id blocks
    cell_types: int = 6  # number of cell types
    seed: int = 0  # master seed
    libsize: float = 0.0  # median UMIs per cell; 0 = auto (0.15 * genes, capped at 3000)
    markers: int = 0  # marker genes per cell type; 0 = auto (max(3, genes // 40))
    dispersion: float = 2.0  # median NB dispersion r (variance = mu + mu^2 / r)
    primary_fraction: float = 0.9  # fraction of cells with is_primary_data True

    def median_libsize(self) -> float:
        """Median library size in UMIs."""
        return self.libsize if self.libsize > 0 else min(3000.0, 0.15 * self.genes)

    def num_markers(self) -> int:
        """Marker genes per cell type."""
        return self.markers if self.markers > 0 else max(3, self.genes // 40)


def parse_spec(text: str) -> SyntheticSpec:
    """Parse `cells=N,genes=G,...` (an optional `synthetic:` prefix is ignored)."""
    text = text.removeprefix("synthetic:").strip()
    fields = SyntheticSpec.__dataclass_fields__
    kwargs: dict[str, float | int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = part.partition("=")
        if not sep or key not in fields:
            raise ValueError(
                f"bad synthetic spec item {part!r}; expected key=value with key in {sorted(fields)}"
            )
        kwargs[key] = float(val) if fields[key].type == "float" else int(val)
    spec = SyntheticSpec(**kwargs)
    if min(spec.cells, spec.genes, spec.datasets, spec.cell_types) < 1:
        raise ValueError(f"synthetic spec needs positive sizes, got {spec}")
    return spec


class _Model:
    """Global parameters, drawn once from the seed (independent of blocks)."""

    def __init__(self, spec: SyntheticSpec):
        rng = np.random.default_rng([spec.seed, 2**31 - 1])
        G, T, D = spec.genes, spec.cell_types, spec.datasets
        self.spec = spec
        self.base = rng.normal(0.0, 1.6, G)  # log gene means
        self.programs = np.tile(self.base, (T, 1))
        for t in range(T):
            markers = rng.choice(G, size=min(spec.num_markers(), G), replace=False)
            self.programs[t, markers] += rng.uniform(1.5, 3.0, markers.size)
        self.shift = rng.normal(0.0, 0.3, (D, G))
        self.lib_factor = np.exp(rng.normal(0.0, 0.2, D))
        self.r = spec.dispersion * np.exp(rng.normal(0.0, 0.5, G))
        weights = rng.dirichlet(np.full(D, 4.0))  # unequal dataset sizes
        bounds = np.round(np.cumsum(weights) * spec.cells).astype(np.int64)
        self.ds_start = np.concatenate([[0], bounds[:-1]])
        self.ds_start = np.maximum.accumulate(self.ds_start)
        self.type_mix = rng.dirichlet(np.full(T, 1.5), size=D)
        self._p: dict[tuple[int, int], np.ndarray] = {}

    def probs(self, d: int, t: int) -> np.ndarray:
        """Expected gene fractions for dataset d and type t (sums to 1)."""
        key = (d, t)
        if key not in self._p:
            logits = self.programs[t] + self.shift[d]
            p = np.exp(logits - logits.max())
            self._p[key] = (p / p.sum()).astype(np.float32)
        return self._p[key]

    def dataset_of(self, cells: np.ndarray) -> np.ndarray:
        """Dataset index of each global cell index."""
        return np.searchsorted(self.ds_start, cells, side="right") - 1


def _sample_nb(u: np.ndarray, mu: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Inverse-CDF NB draws for entries known to be > 0 (u above the zero mass)."""
    u, mu, r = u.astype(np.float64), mu.astype(np.float64), r.astype(np.float64)
    q = mu / (r + mu)
    pmf = np.exp(r * np.log1p(-q))
    cdf = pmf.copy()
    out = np.zeros(u.size, dtype=np.float32)
    active = np.arange(u.size)
    k = 0
    # Work is proportional to the total count, because entries leave once their CDF passes u.
    while active.size:
        pmf = pmf * (k + r) / (k + 1) * q
        k += 1
        cdf = cdf + pmf
        done = (u <= cdf) | (pmf < 1e-300)
        out[active[done]] = k
        keep = ~done
        active, u, q, r, pmf, cdf = active[keep], u[keep], q[keep], r[keep], pmf[keep], cdf[keep]
    return out


def generate_block(spec: SyntheticSpec, block: int, model: _Model | None = None):
    """Return (CSR float32 counts, obs DataFrame) of generator block `block`."""
    model = model or _Model(spec)
    lo, hi = block * GEN_BLOCK, min((block + 1) * GEN_BLOCK, spec.cells)
    rng = np.random.default_rng([spec.seed, block])
    cells = np.arange(lo, hi)
    ds = model.dataset_of(cells)
    cum = np.cumsum(model.type_mix[ds], axis=1)
    types = (rng.random(cells.size)[:, None] > cum).sum(axis=1).clip(0, spec.cell_types - 1)
    lib = spec.median_libsize() * model.lib_factor[ds] * np.exp(rng.normal(0.0, 0.5, cells.size))
    mu = np.stack([model.probs(d, t) for d, t in zip(ds, types, strict=True)])
    mu *= lib[:, None].astype(np.float32)
    r = model.r.astype(np.float32)
    # NB zero mass per entry, (r / (r + mu))^r, computed in place to bound temporaries.
    mu_over = r + mu
    np.divide(mu, mu_over, out=mu_over)
    np.negative(mu_over, out=mu_over)
    np.log1p(mu_over, out=mu_over)
    np.multiply(mu_over, r, out=mu_over)
    p0 = np.exp(mu_over, out=mu_over)
    u = rng.random(mu.shape, dtype=np.float32)
    flat = np.flatnonzero(u > p0)
    rows, cols = np.divmod(flat, spec.genes)
    vals = _sample_nb(u.ravel()[flat], mu.ravel()[flat], r[cols])
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=cells.size))])
    X = sp.csr_matrix((vals, cols.astype(np.int32), indptr), shape=(cells.size, spec.genes))
    primary = rng.random(cells.size) < spec.primary_fraction
    obs = pd.DataFrame(
        {
            "dataset_id": [f"dataset_{d:03d}" for d in ds],
            "assay": "10x 3' v3",
            "cell_type": [f"type_{t:02d}" for t in types],
            "donor_id": [f"donor_{d:03d}_{i % 2}" for d, i in zip(ds, cells, strict=True)],
            "tissue": "blood",
            "tissue_general": "blood",
            "is_primary_data": primary,
            "raw_sum": np.asarray(X.sum(axis=1)).ravel().astype(np.float64),
            "nnz": np.diff(X.indptr).astype(np.int64),
        },
        index=pd.Index([f"cell_{c}" for c in cells], name="obs_id"),
    )
    return X, obs


def generate_anndata(spec: SyntheticSpec):
    """Whole synthetic data set as AnnData (counts in X); for small tests only."""
    import anndata as ad

    model = _Model(spec)
    parts = [generate_block(spec, b, model) for b in range(-(-spec.cells // GEN_BLOCK))]
    X = sp.vstack([p[0] for p in parts]).tocsr()
    obs = pd.concat([p[1] for p in parts])
    return ad.AnnData(X=X, obs=obs, var=var_frame(spec))


def var_frame(spec: SyntheticSpec) -> pd.DataFrame:
    """Census-like var: feature_id (Ensembl-like, unique), feature_name, feature_length."""
    g = np.arange(spec.genes)
    return pd.DataFrame(
        {
            "feature_id": [f"ENSG{i:011d}" for i in g],
            "feature_name": [f"GENE{i:05d}" for i in g],
            "feature_length": (1000 + (g * 7919) % 9000).astype(np.int64),
        },
        index=pd.Index([f"ENSG{i:011d}" for i in g], name="var_id"),
    )


# Coordinates we pass are already in the array's global order: TileDB skips its sort, which
# costs more CPU than the rest of the write.
GLOBAL_ORDER = {"tiledb": {"write": {"sort_coords": False}}}
CENSUS_TILE = 2048


def _global_order_table(X: sp.coo_matrix, row0: int, n_genes: int) -> pa.Table:
    """COO table sorted in the global order of 2048 x 2048 row-major tiles."""
    rows = X.row.astype(np.int64) + row0
    cols = X.col.astype(np.int64)
    n_col_tiles = -(-n_genes // CENSUS_TILE)
    tile = (rows // CENSUS_TILE) * n_col_tiles + cols // CENSUS_TILE
    key = (tile * CENSUS_TILE + rows % CENSUS_TILE) * CENSUS_TILE + cols % CENSUS_TILE
    order = np.argsort(key, kind="stable")
    return pa.table(
        {
            "soma_dim_0": rows[order],
            "soma_dim_1": cols[order],
            "soma_data": X.data.astype(np.float32)[order],
        }
    )


def census_obs_schema() -> pa.Schema:
    """obs schema of the Census-layout experiment."""
    fields = [pa.field("soma_joinid", pa.int64())]
    fields += [pa.field(c, pa.large_string()) for c in OBS_STRING_COLUMNS]
    fields += [
        pa.field("is_primary_data", pa.bool_()),
        pa.field("raw_sum", pa.float64()),
        pa.field("nnz", pa.int64()),
    ]
    return pa.schema(fields)


def census_x_platform_config(zstd_level: int = 9) -> dict:
    """Census X layout: tiles 2048 x 2048, capacity 65536, zstd + byte shuffle, row-major."""
    return {
        "tiledb": {
            "create": {
                "capacity": 65536,
                "cell_order": "row-major",
                "tile_order": "row-major",
                "dims": {"soma_dim_0": {"tile": 2048}, "soma_dim_1": {"tile": 2048}},
                "attrs": {
                    "soma_data": {
                        "filters": [
                            "ByteShuffleFilter",
                            {"_type": "ZstdFilter", "level": zstd_level},
                        ]
                    }
                },
            }
        }
    }


# Blocks of a corpus above which generation runs in worker processes (below, their start-up
# costs more than they save).
PARALLEL_MIN_BLOCKS = 64


def default_workers() -> int:
    """Generator processes for a large corpus: one per core (the writer overlaps), at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cores or 1))


def write_synthetic_experiment(
    uri: str | Path,
    spec: SyntheticSpec | str,
    block_cells: int = 16384,
    zstd_level: int = 9,
    workers: int = 1,
) -> str:
    """Write (or reuse) a Census-layout SOMA experiment of `spec` at local path `uri`.

    A sibling marker `<uri>.complete.json` records a finished write of the same spec; an
    incomplete folder is deleted and rewritten (generation is deterministic, so the result is the
    same). With `workers` > 1 (`default_workers()`: one per core), write chunks of
    `block_cells` are generated by that many spawned processes while this one writes them in
    order; the array is the same for any `workers`. Spawned processes import the caller's main
    module, so a script that passes `workers` needs the `if __name__ == "__main__":` guard.
    Small corpora are always generated here. Peak memory is about 30 bytes x GEN_BLOCK x genes
    plus two write chunks of COO, per worker.

    Returns:
        The experiment URI as a string.
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    uri = Path(uri)
    marker = uri.with_name(uri.name + ".complete.json")
    if marker.is_file() and json.loads(marker.read_text()) == asdict(spec):
        logger.info("reusing synthetic experiment %s", uri)
        return str(uri)
    if uri.exists():
        shutil.rmtree(uri)
    marker.unlink(missing_ok=True)
    uri.parent.mkdir(parents=True, exist_ok=True)
    _create_census_experiment(str(uri), spec, zstd_level)
    gene_nnz = np.zeros(spec.genes, dtype=np.int64)
    per_write = max(1, block_cells // GEN_BLOCK)
    n_blocks = -(-spec.cells // GEN_BLOCK)
    firsts = range(0, n_blocks, per_write)
    # Progress lines where INFO is shown (the benchmarks' logs), as ingest does.
    show = logger.isEnabledFor(logging.INFO)
    progress = Progress("synthetic", spec.cells, "cells") if show else None
    with tiledbsoma.Experiment.open(str(uri), mode="w") as exp:
        X_arr, obs_arr = exp.ms["RNA"].X["raw"], exp.obs
        for x_table, obs_table, chunk_nnz in _chunks(spec, firsts, per_write, workers, n_blocks):
            gene_nnz += chunk_nnz
            X_arr.write(x_table, platform_config=GLOBAL_ORDER)
            obs_arr.write(obs_table, platform_config=GLOBAL_ORDER)
            if progress is not None:
                progress.update(obs_table.num_rows)
        var = var_frame(spec).reset_index(drop=True)
        var.insert(0, "soma_joinid", np.arange(spec.genes, dtype=np.int64))
        var["nnz"] = gene_nnz
        var["n_measured_obs"] = np.full(spec.genes, spec.cells, dtype=np.int64)
        exp.ms["RNA"].var.write(pa.Table.from_pandas(var, preserve_index=False))
    if progress is not None:
        progress.close()
    marker.write_text(json.dumps(asdict(spec)))
    return str(uri)


def _chunks(spec: SyntheticSpec, firsts: range, per_write: int, workers: int, n_blocks: int):
    """The write chunks in order: generated here, or by a pool with a bounded queue."""
    if workers <= 1 or n_blocks < PARALLEL_MIN_BLOCKS:
        model = _Model(spec)
        for first in firsts:
            yield write_chunk(spec, first, per_write, model)
        return
    # spawn, not fork: this process holds TileDB's threads and locks.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        pending: deque = deque()
        todo = iter(firsts)
        for first in itertools.islice(todo, workers + 1):  # each chunk holds ~20 B per nnz
            pending.append(pool.submit(write_chunk, spec, first, per_write))
        while pending:
            chunk = pending.popleft().result()
            for first in itertools.islice(todo, 1):
                pending.append(pool.submit(write_chunk, spec, first, per_write))
            yield chunk


def write_chunk(
    spec: SyntheticSpec, first: int, per_write: int, model: _Model | None = None
) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """(X in global order, obs, nonzeros per gene) of `per_write` blocks from block `first`."""
    model = model or _Model(spec)
    n_blocks = -(-spec.cells // GEN_BLOCK)
    parts = [generate_block(spec, b, model) for b in range(first, min(first + per_write, n_blocks))]
    X = sp.vstack([p[0] for p in parts]).tocoo()
    obs = pd.concat([p[1] for p in parts]).reset_index(drop=True)
    row0 = first * GEN_BLOCK
    obs.insert(0, "soma_joinid", np.arange(row0, row0 + len(obs), dtype=np.int64))
    obs_table = pa.Table.from_pandas(obs, schema=census_obs_schema(), preserve_index=False)
    gene_nnz = np.bincount(X.col, minlength=spec.genes)
    return _global_order_table(X, row0, spec.genes), obs_table, gene_nnz


def _create_census_experiment(uri: str, spec: SyntheticSpec, zstd_level: int) -> None:
    """Create the empty experiment: obs, ms/RNA/var and X/raw with the Census layout."""
    var_schema = pa.schema(
        [
            pa.field("soma_joinid", pa.int64()),
            pa.field("feature_id", pa.large_string()),
            pa.field("feature_name", pa.large_string()),
            pa.field("feature_length", pa.int64()),
            pa.field("nnz", pa.int64()),
            pa.field("n_measured_obs", pa.int64()),
        ]
    )
    with tiledbsoma.Experiment.create(uri) as exp:
        exp.add_new_dataframe("obs", schema=census_obs_schema(), domain=[(0, spec.cells - 1)])
        ms = exp.add_new_collection("ms")
        rna = ms.add_new_collection("RNA", tiledbsoma.Measurement)
        rna.add_new_dataframe("var", schema=var_schema, domain=[(0, spec.genes - 1)])
        xs = rna.add_new_collection("X")
        xs.add_new_sparse_ndarray(
            "raw",
            type=pa.float32(),
            shape=(spec.cells, spec.genes),
            platform_config=census_x_platform_config(zstd_level),
        )

"""scDataset in the loader benchmark: the h5ad it reads, and its batches.

The h5ad is the Census-layout experiment written out as AnnData (raw counts as float32 CSR, obs
`dataset_id`, uncompressed like `write_h5ad`'s default) by :func:`export_h5ad`, in the same row
order; annbatch's writer (:mod:`.loader_peers_annbatch`) shuffles it into its own format.
scDataset reads it backed (`read_h5ad(backed="r")`) with `BlockShuffling`, its fetch callback
indexing the backed AnnData as its documentation's AnnData example does (without densifying: no
loader here densifies). Settings (:data:`SETTINGS`): scDataset's own recommendation (block size
= fetch factor, the "balanced" choice of its `suggest_parameters`, 16 as in its AnnData example)
and the annbatch paper's (block size 4, fetch factor 16 at batch 4,096, i.e. 65,536 cells per
fetch: fetch factor 256 at our batch of 256).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from atlasldm.bench.loader_peers_measure import BATCH, over_epochs

# Printed name -> (block_size, fetch_factor at batch 256)
SETTINGS = {
    "scDataset recommended (block 16, fetch 16)": (16, 16),
    "scDataset, annbatch paper (block 4, fetch 65,536 cells)": (4, 65536 // BATCH),
}
EXPORT_ROWS = 16384  # rows per TileDB read while writing the h5ad


def export_h5ad(census_uri: str, out: Path) -> float:
    """Write the experiment's X (raw), obs `dataset_id` and var to `out`; return seconds.

    Written to a temporary name and renamed, so an interrupted export leaves no `out`.
    """
    import anndata as ad
    import h5py
    import pandas as pd
    import tiledbsoma

    from atlasldm.data.soma import read_csr

    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    with tiledbsoma.Experiment.open(census_uri) as exp:
        labels = exp.obs.read(column_names=["dataset_id"]).concat()["dataset_id"].to_numpy()
        var = exp.ms["RNA"].var.read(column_names=["feature_id"]).concat().to_pandas()
        X = exp.ms["RNA"].X["raw"]
        var_ids = np.arange(len(var), dtype=np.int64)
        obs = pd.DataFrame(
            {"dataset_id": pd.Categorical(labels.astype(str))},
            index=pd.Index([f"cell_{i}" for i in range(len(labels))]),
        )
        with h5py.File(tmp, "w") as f:
            f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
            ad.io.write_elem(f, "obs", obs)
            ad.io.write_elem(f, "var", pd.DataFrame(index=pd.Index(var["feature_id"])))
            for lo in range(0, len(labels), EXPORT_ROWS):
                ids = np.arange(lo, min(lo + EXPORT_ROWS, len(labels)), dtype=np.int64)
                block = read_csr(X, ids, var_ids)
                if lo == 0:
                    ad.io.write_elem(f, "X", block)
                else:
                    ad.io.sparse_dataset(f["X"]).append(block)
    os.replace(tmp, out)
    return time.perf_counter() - t0


def _fetch(collection, indices: np.ndarray):
    """scDataset fetch callback: one backed read of the sorted fetch, with labels and ids."""
    X = collection[indices].X
    codes = collection.obs["dataset_id"].cat.codes.to_numpy()[indices]
    return X, codes, indices


def _batch(data, positions: np.ndarray):
    X, codes, ids = data
    return X[positions], codes[positions], ids[positions]


def scdataset(h5ad: str, setting: tuple[int, int], seed: int, shard: tuple[int, int]):
    """scDataset over the backed h5ad; `shard` = (rank, world size), its own DDP split."""
    import anndata as ad
    from scdataset import BlockShuffling, scDataset

    adata = ad.read_h5ad(h5ad, backed="r")
    block_size, fetch_factor = setting
    return scDataset(
        adata,
        BlockShuffling(block_size=block_size),
        batch_size=BATCH,
        fetch_factor=fetch_factor,
        fetch_callback=_fetch,
        batch_callback=_batch,
        rank=shard[0],
        world_size=shard[1],
        seed=seed,
    )


def scdataset_batches(
    h5ad: str, setting: tuple[int, int], seed: int, shard: tuple[int, int]
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(cells, nonzeros, dataset codes) per batch, epoch after epoch (EPOCH_END between); the
    dataset is built on the first next(), and each epoch is a new pass of it."""
    ds = scdataset(h5ad, setting, seed, shard)

    def epoch(_e: int) -> Iterator[tuple[int, int, np.ndarray]]:
        for X, codes, _ids in ds:
            yield X.shape[0], X.nnz, codes

    yield from over_epochs(epoch)


def scdataset_probes(
    h5ad: str, setting: tuple[int, int], seed: int, shard: tuple[int, int]
) -> dict:
    """Test whether a second pass starts with other cells; look for a resume API."""
    from atlasldm.bench.loader_peers_measure import order_differs

    ds = scdataset(h5ad, setting, seed, shard)
    differs = order_differs(lambda _epoch: (ids for _X, _c, ids in ds))
    resume = any(hasattr(ds, m) for m in ("state_dict", "load_state_dict"))
    return {"order_differs_tested": differs, "resume_api": resume}


def disk_bytes(path: Path) -> int:
    """Bytes a file or folder takes on disk (allocated blocks, like `du`)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files)

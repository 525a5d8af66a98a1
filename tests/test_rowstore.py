"""The copy's row store: same entries as the SOMA X, same stream, float32 fallback, staleness."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from atlasldm.data.config import DataConfig
from atlasldm.data.ingest import main as run_ingest
from atlasldm.data.reader import CopySource
from atlasldm.data.rowstore import MARKER, RowStore, build_row_store, has_row_store, row_store_dir
from atlasldm.data.stream import CellStream
from atlasldm.data.validate import IngestError


def _stream_batches(cfg: DataConfig, world: int, epochs: int = 2) -> list:
    out = []
    for rank in range(world):
        stream = CellStream(cfg, "train", rank, world)
        for epoch in range(epochs):
            stream.set_epoch(epoch)
            out.extend(stream)
        stream.close()
    return out


def test_row_store_holds_the_copys_entries(pbmc_copy, read_copy) -> None:
    assert has_row_store(pbmc_copy)  # ingest writes it by default
    X, *_ = read_copy(pbmc_copy)
    rows = RowStore(pbmc_copy)
    assert rows.meta["genes_dtype"] == "uint16" and rows.meta["counts_dtype"] == "uint16"
    np.testing.assert_array_equal(np.asarray(rows.indptr), X.indptr)
    np.testing.assert_array_equal(np.asarray(rows.genes), X.indices + 1)  # tokens
    np.testing.assert_array_equal(np.asarray(rows.counts), X.data)


def test_stream_through_the_row_store_equals_the_tiledb_stream(small_synthetic_copy) -> None:
    cfg = DataConfig(
        source=str(small_synthetic_copy),
        micro_batch=64,
        val_fraction=0.2,
        condition_columns=["cell_type"],
        reader_threads=2,
    )
    fast = _stream_batches(cfg, world=2)
    slow = _stream_batches(replace(cfg, row_store="off"), world=2)
    assert len(fast) == len(slow) > 0
    for a, b in zip(fast, slow, strict=True):
        for field in (
            "gene_ids",
            "counts",
            "cu_seqlens",
            "library_size",
            "conditions",
            "soma_joinid",
        ):
            assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_large_counts_fall_back_to_float32(tmp_path) -> None:
    # Two workers decide the dtype from the scatter pass alike, whichever blocks they write.
    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, (50, 20)).astype(np.float32)
    X[3, 4] = 70_000  # beyond uint16
    var = pd.DataFrame(
        {"feature_id": [f"G{i}" for i in range(20)]}, index=[f"g{i}" for i in range(20)]
    )
    obs = pd.DataFrame({"cell_type": ["A", "B"] * 25}, index=[f"c{i}" for i in range(50)])
    ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var).write_h5ad(tmp_path / "big.h5ad")
    base = ["--source", str(tmp_path / "big.h5ad"), "--log-level", "WARNING", "--block-cells", "8"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_ingest([*base, "--out", str(one)]) == 0
    for i in range(2):
        run_ingest([*base, "--out", str(two), "--workers", "2", "--worker-index", str(i)])
    for out in (one, two):
        rows = RowStore(out)
        assert rows.meta["counts_dtype"] == "float32"
        assert float(np.max(rows.counts)) == 70_000
    for name in ("indptr", "genes", "counts"):
        np.testing.assert_array_equal(getattr(RowStore(one), name), getattr(RowStore(two), name))


def test_row_store_written_by_ingest_equals_the_serial_build(small_synthetic_copy, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_synthetic_copy, copy)
    build_row_store(copy, block_cells=700)  # other blocks than the ingest's 1,024
    for name in ("indptr.npy", "genes.npy", "counts.npy", "rows.json"):
        a, b = row_store_dir(copy) / name, row_store_dir(small_synthetic_copy) / name
        assert a.read_bytes() == b.read_bytes(), name


def test_incomplete_or_foreign_row_store_is_not_read(small_synthetic_copy, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(small_synthetic_copy, copy)
    cfg = DataConfig(source=str(copy))
    meta_path = row_store_dir(copy) / MARKER
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "copy_fingerprint": "another copy"}))
    assert CopySource(cfg, None)._rows is None
    meta_path.unlink()  # interrupted build: no marker
    assert not has_row_store(copy) and CopySource(cfg, None)._rows is None
    build_row_store(copy)  # rebuilt: read again
    assert CopySource(cfg, None)._rows is not None


def test_truncated_row_store_names_the_file(small_synthetic_copy, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(small_synthetic_copy, copy)
    counts = row_store_dir(copy) / "counts.npy"
    with open(counts, "r+b") as fh:
        fh.truncate(counts.stat().st_size // 2)
    store = RowStore(copy)
    n = int(np.asarray(store.indptr).shape[0]) - 1
    with pytest.raises(IngestError, match="counts.npy ends before"):
        store.read(np.arange(n - 10, n))

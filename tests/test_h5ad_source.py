"""Direct mode over an h5ad file: the same stream as over the same cells in a SOMA experiment.

The reference is the SOMA direct source (tests/test_stream.py checks it against X itself): the
h5ad export of one experiment must give the same batches, cell for cell and gene for gene, at any
world size, chunk length and split, whether the file is compressed or its rows' genes unsorted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import tiledbsoma
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlasldm.data.config import DataConfig
from atlasldm.data.h5ad_x import H5adCsr, _ByteMap
from atlasldm.data.stream import CellStream
from atlasldm.data.synthetic import SyntheticSpec, var_frame, write_synthetic_experiment
from atlasldm.data.validate import IngestError
from atlasldm.data.vocab import GeneVocab

N, G = 1500, 60


def same_batches(a, b) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b, strict=True):
        for name in ("soma_joinid", "gene_ids", "counts", "cu_seqlens", "library_size"):
            assert np.array_equal(getattr(x, name).numpy(), getattr(y, name).numpy()), name
        assert np.array_equal(x.conditions.numpy(), y.conditions.numpy())


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    """A Census-layout experiment, its h5ad exports and a vocabulary that permutes genes."""
    root = tmp_path_factory.mktemp("h5ad")
    spec = SyntheticSpec(cells=N, genes=G, datasets=3, seed=1)
    uri = write_synthetic_experiment(root / "exp", spec)
    with tiledbsoma.Experiment.open(uri) as exp:
        tbl = exp.ms["RNA"].X["raw"].read().tables().concat()
        obs = exp.obs.read(column_names=["dataset_id", "donor_id", "is_primary_data"])
        obs = obs.concat().to_pandas()
    rows, cols = tbl["soma_dim_0"].to_numpy(), tbl["soma_dim_1"].to_numpy()
    x = sp.csr_matrix((tbl["soma_data"].to_numpy(), (rows, cols)), shape=(N, G))
    x.sort_indices()
    var = var_frame(spec)[["feature_id"]].reset_index(drop=True)
    for c in ("dataset_id", "donor_id"):
        obs[c] = obs[c].astype("category")
    adata = ad.AnnData(X=x, obs=obs.set_index(obs.index.astype(str)), var=var)
    files = {"plain": root / "plain.h5ad", "gzip": root / "gzip.h5ad"}
    adata.write_h5ad(files["plain"])
    adata.write_h5ad(files["gzip"], compression="gzip")
    unsorted = x.copy()  # every row's genes in descending order: a valid, unsorted CSR
    for i in range(N):
        lo, hi = unsorted.indptr[i], unsorted.indptr[i + 1]
        unsorted.indices[lo:hi] = unsorted.indices[lo:hi][::-1]
        unsorted.data[lo:hi] = unsorted.data[lo:hi][::-1]
    unsorted.has_sorted_indices = False
    files["unsorted"] = root / "unsorted.h5ad"
    ad.AnnData(X=unsorted, obs=adata.obs, var=var).write_h5ad(files["unsorted"])
    feature_ids = [*var["feature_id"][:50][::-1], *[f"ENSGFAKE{i}" for i in range(5)]]
    vocab = root / "genes.tsv"
    GeneVocab(feature_ids, [f"g{i}" for i in range(55)]).save(vocab)
    return {"uri": uri, "files": files, "vocab": str(vocab), "x": x}


def stream(pair, source: str, W=1, r=0, split="all", **kw) -> CellStream:
    base = dict(
        source=source,
        mode="direct",
        vocab_path=pair["vocab"],
        unknown_genes="drop",
        micro_batch=32,
        chunks_per_rank_round=2,
        reader_threads=2,
        condition_columns=["dataset_id"],
    )
    return CellStream(DataConfig(**{**base, **kw}), split=split, rank=r, world_size=W)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    W=st.integers(1, 3),
    chunk=st.sampled_from([16, 64, 256]),
    val=st.sampled_from([0.0, 0.2]),
    key=st.sampled_from(["soma_joinid", "donor_id"]),
)
def test_h5ad_stream_equals_the_soma_stream_of_the_same_cells(pair, W, chunk, val, key):
    kw = dict(chunk_cells=chunk, val_fraction=val, split_key=key)
    for r in range(W):
        soma = list(stream(pair, pair["uri"], W, r, "train", **kw))
        h5ad = list(stream(pair, str(pair["files"]["plain"]), W, r, "train", **kw))
        same_batches(h5ad, soma)


@pytest.mark.parametrize("variant", ["gzip", "unsorted"])
def test_compressed_or_unsorted_files_give_the_same_batches(pair, variant):
    plain = list(stream(pair, str(pair["files"]["plain"]), chunk_cells=64))
    other = list(stream(pair, str(pair["files"][variant]), chunk_cells=64))
    same_batches(other, plain)


def test_obs_filter_is_a_pandas_query_selecting_the_same_cells(pair):
    query = "is_primary_data == True"
    soma = list(stream(pair, pair["uri"], obs_filter=query, chunk_cells=64))
    h5ad = list(stream(pair, str(pair["files"]["plain"]), obs_filter=query, chunk_cells=64))
    same_batches(h5ad, soma)
    with pytest.raises(ValueError, match="not a pandas query.*columns"):
        stream(pair, str(pair["files"]["plain"]), obs_filter="no_such_column == 1")


def test_resume_is_exact_mid_epoch(pair):
    source = str(pair["files"]["plain"])
    s = stream(pair, source, 2, 1, chunk_cells=64)
    full, states = [], []
    for batch in s:
        full.append(batch)
        states.append(s.state_dict())
    for pos in (0, len(full) // 2, len(full) - 2):
        resumed = stream(pair, source, 2, 1, chunk_cells=64, reader_threads=0)
        resumed.load_state_dict(states[pos])
        same_batches(list(resumed), full[pos + 1 :])


def test_a_changed_file_refuses_an_old_position(pair, tmp_path):
    source = tmp_path / "cells.h5ad"
    source.write_bytes(pair["files"]["plain"].read_bytes())
    state = stream(pair, str(source)).state_dict()
    ad.read_h5ad(source)[:-10].write_h5ad(source)  # ten cells fewer
    with pytest.raises(ValueError, match="fingerprint"):
        stream(pair, str(source)).load_state_dict(state)


def test_chunks_stored_out_of_order_are_read_by_position(tmp_path):
    """Chunks written last-to-first lie in reverse order in the file: the byte map follows them."""
    values = np.arange(1000, dtype=np.float32)
    path = tmp_path / "chunks.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("v", shape=(1000,), dtype="f4", chunks=(64,))
        for start in reversed(range(0, 1000, 64)):
            block = np.zeros(64, np.float32)
            block[: min(64, 1000 - start)] = values[start : start + 64]
            ds.id.write_direct_chunk((start,), block.tobytes())
    with h5py.File(path, "r") as f:
        byte_map = _ByteMap(f["v"])
        assert len(byte_map.offsets) > 1  # not merged into one range
        fd = os.open(path, os.O_RDONLY)
        try:
            for lo, hi in [(0, 1000), (63, 65), (100, 700), (999, 1000), (5, 5)]:
                out = np.concatenate(
                    [
                        np.frombuffer(os.pread(fd, n, at), np.float32)
                        for at, n in byte_map.ranges(lo, hi)
                    ]
                    or [np.zeros(0, np.float32)]
                )
                assert np.array_equal(out, values[lo:hi])
        finally:
            os.close(fd)


def test_rows_read_by_position_equal_the_matrix(pair):
    x, reader = pair["x"], H5adCsr(pair["files"]["plain"])
    try:
        assert reader.compressed == []
        rng = np.random.default_rng(0)
        scattered = np.sort(rng.choice(N, 200, replace=False))
        for rows in [np.arange(N), np.array([17]), np.arange(700, 1300), scattered]:
            indptr, cols, vals = reader.read_rows(rows)
            got = sp.csr_matrix((vals, cols, indptr), shape=(len(rows), G))
            assert (got != x[rows]).nnz == 0
    finally:
        reader.close()


def _one_line_error(pair, source: str, **kw) -> str:
    code = (
        "import sys; from atlasldm.data.config import DataConfig; "
        "from atlasldm.data.stream import CellStream\n"
        "try:\n"
        f"    CellStream(DataConfig(source={source!r}, mode='direct', "
        f"vocab_path={pair['vocab']!r}, unknown_genes='drop', **{kw!r}))\n"
        "except Exception as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr[-2000:]
    return done.stdout.strip()


def test_bad_files_get_one_line_that_names_the_fix(pair, tmp_path):
    dense = tmp_path / "dense.h5ad"
    ad.AnnData(X=pair["x"].toarray(), var=ad.read_h5ad(pair["files"]["plain"]).var).write_h5ad(
        dense
    )
    text = tmp_path / "notes.h5ad"
    text.write_text("not hdf5")
    cases = {
        str(dense): "stored as dense.*csr_matrix",
        str(text): "not a readable h5ad.*write it again",
        str(tmp_path / "missing.h5ad"): "no such h5ad file",
    }
    for source, pattern in cases.items():
        message = _one_line_error(pair, source)
        assert "\n" not in message and re.search(pattern, message), message
    message = _one_line_error(pair, str(pair["files"]["plain"]), condition_columns=["tissue_x"])
    assert "tissue_x" in message and "have" in message
    with pytest.raises(IngestError):
        H5adCsr(text)

"""CsrBatch views and the CSR kernels behind it, against scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from data.batch import CsrBatch
from data.pipeline import Csr, gather_positions, gather_rows, truncate_rows


def random_csr(n_rows=7, n_genes=50, density=0.2, seed=0) -> sp.csr_matrix:
    m = sp.random(n_rows, n_genes, density=density, format="csr", random_state=seed)
    m.data = np.ceil(m.data * 10).astype(np.float32)
    m.data[m.indptr[2] : m.indptr[3]] = 0  # an empty cell
    m.eliminate_zeros()
    return m.astype(np.float32)


def to_batch(m: sp.csr_matrix) -> CsrBatch:
    return CsrBatch.from_numpy(
        m.indices + 1, m.data, m.indptr, np.asarray(m.sum(axis=1)).ravel() + 5,
        np.arange(m.shape[0] * 2).reshape(-1, 2), ("a", "b"), np.arange(m.shape[0]) + 100,
    )  # fmt: skip


def test_dtypes_and_sizes():
    m = random_csr()
    batch = to_batch(m)
    assert batch.gene_ids.dtype == torch.int32 and batch.counts.dtype == torch.float32
    assert batch.cu_seqlens.dtype == torch.int32 and batch.library_size.dtype == torch.float32
    assert batch.conditions.dtype == torch.int64 and batch.conditions.shape == (7, 2)
    assert batch.soma_joinid.dtype == torch.int64
    assert batch.num_cells == 7 and batch.num_tokens == m.nnz
    assert int(batch.cu_seqlens[0]) == 0 and int(batch.cu_seqlens[-1]) == m.nnz


def test_padded_round_trips_to_dense():
    m = random_csr()
    gene_ids, counts, mask = to_batch(m).padded()
    assert gene_ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert gene_ids.shape[1] == np.diff(m.indptr).max()
    dense = np.zeros(m.shape, dtype=np.float32)
    rows = np.repeat(np.arange(m.shape[0]), mask.sum(1).numpy())
    dense[rows, gene_ids[mask].numpy() - 1] = counts[mask].numpy()
    np.testing.assert_array_equal(dense, m.toarray())
    assert (gene_ids[~mask] == 0).all() and (counts[~mask] == 0).all()
    assert mask.sum(1).tolist() == np.diff(m.indptr).tolist()


def test_padded_max_len():
    batch = to_batch(random_csr())
    longest = int(torch.diff(batch.cu_seqlens).max())
    assert batch.padded(max_len=longest + 3)[0].shape == (7, longest + 3)
    with pytest.raises(ValueError, match="max_len"):
        batch.padded(max_len=longest - 1)


def test_to_keeps_fields():
    batch = to_batch(random_csr())
    moved = batch.to("cpu", non_blocking=True)
    assert torch.equal(moved.gene_ids, batch.gene_ids) and moved.condition_names == ("a", "b")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs an accelerator")
def test_pin_memory():
    assert to_batch(random_csr()).pin_memory().counts.is_pinned()


def test_gather_rows_matches_scipy():
    m = random_csr(n_rows=20, seed=1)
    rows = np.array([5, 2, 19, 0, 5])
    out = gather_rows(Csr(m.indptr.astype(np.int64), m.indices.astype(np.int32), m.data), rows)
    ref = m[rows]
    np.testing.assert_array_equal(out.indptr, ref.indptr)
    np.testing.assert_array_equal(out.indices, ref.indices)
    np.testing.assert_array_equal(out.data, ref.data)


def test_truncate_rows_deterministic_subset():
    m = random_csr(n_rows=30, n_genes=200, density=0.3, seed=2)
    csr = Csr(m.indptr.astype(np.int64), (m.indices + 1).astype(np.int32), m.data)
    joinids = np.arange(30) * 7
    out, truncated = truncate_rows(csr, joinids, max_genes=40, seed=0)
    lengths = np.diff(m.indptr)
    assert np.array_equal(truncated, lengths > 40) and truncated.any()
    assert np.array_equal(np.diff(out.indptr), np.minimum(lengths, 40))
    for i in range(30):
        kept = out.indices[out.indptr[i] : out.indptr[i + 1]]
        full = csr.indices[csr.indptr[i] : csr.indptr[i + 1]]
        assert np.all(np.diff(kept) > 0) and np.isin(kept, full).all()
        values = out.data[out.indptr[i] : out.indptr[i + 1]]
        np.testing.assert_array_equal(values, csr.data[csr.indptr[i] + np.searchsorted(full, kept)])
    # Same cell (joinid), other batch composition and order -> same genes kept.
    rows = np.array([29, 3, 17])
    sub, _ = truncate_rows(gather_rows(csr, rows), joinids[rows], 40, 0)
    ref = gather_rows(out, rows)
    np.testing.assert_array_equal(sub.indices, ref.indices)
    other_seed, _ = truncate_rows(csr, joinids, 40, 1)
    assert not np.array_equal(other_seed.indices, out.indices)


def test_dataloader_passes_batches_through():
    batch = to_batch(random_csr())
    loader = torch.utils.data.DataLoader([batch], batch_size=None, num_workers=0)
    (out,) = list(loader)
    assert isinstance(out, CsrBatch) and torch.equal(out.counts, batch.counts)


def test_gather_positions_with_scratch_buffer_and_empty_rows():
    starts = np.array([5, 0, 9, 9, 2, 40], dtype=np.int64)
    lengths = np.array([3, 0, 2, 0, 4, 1], dtype=np.int64)
    expected = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
    scratch = np.full(64, -7, dtype=np.int64)
    for out in (None, scratch):
        positions, indptr = gather_positions(starts, lengths, out)
        np.testing.assert_array_equal(positions, expected)
        np.testing.assert_array_equal(indptr, np.concatenate([[0], np.cumsum(lengths)]))
    # leading empty row, and all rows empty
    positions, _ = gather_positions(np.array([3, 7]), np.array([0, 2]), scratch)
    np.testing.assert_array_equal(positions, [7, 8])
    assert len(gather_positions(np.array([3]), np.array([0]), scratch)[0]) == 0

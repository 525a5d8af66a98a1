"""CsrBatch views and the CSR kernels behind it, against scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from atlasldm.data.batch import CsrBatch
from atlasldm.data.csr import (
    Csr,
    csr_from_sorted_coo,
    drop_zero_tokens,
    gather_positions,
    row_sums,
    truncate_rows,
)


def as_csr(m: sp.csr_matrix) -> Csr:
    return Csr(m.indptr.astype(np.int64), m.indices.astype(np.int32), m.data)


def select_rows(csr: Csr, rows: np.ndarray) -> Csr:
    """Rows of `csr` in the order given, through scipy."""
    m = sp.csr_matrix((csr.data, csr.indices, csr.indptr))[rows]
    return as_csr(m)


def random_csr(n_rows=7, n_genes=50, density=0.2, seed=0) -> sp.csr_matrix:
    m = sp.random(n_rows, n_genes, density=density, format="csr", random_state=seed)
    m.data = np.ceil(m.data * 10).astype(np.float32)
    m.data[m.indptr[2] : m.indptr[3]] = 0  # an empty cell
    m.eliminate_zeros()
    return m.astype(np.float32)


def to_batch(m: sp.csr_matrix) -> CsrBatch:
    return CsrBatch.from_numpy(
        m.indices + 1,
        m.data,
        m.indptr,
        np.asarray(m.sum(axis=1)).ravel() + 5,
        np.arange(m.shape[0] * 2).reshape(-1, 2),
        ("a", "b"),
        np.arange(m.shape[0]) + 100,
    )


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


def test_truncate_rows_deterministic_subset():
    m = random_csr(n_rows=30, n_genes=200, density=0.3, seed=2)
    csr = Csr(m.indptr.astype(np.int64), (m.indices + 1).astype(np.int32), m.data)
    joinids = np.arange(30) * 7
    out, truncated = truncate_rows(csr, joinids, max_genes=40, seed=0)
    lengths = np.diff(m.indptr)
    assert np.array_equal(truncated, lengths > 40) and truncated.any() and not truncated.all()
    assert np.array_equal(np.diff(out.indptr), np.minimum(lengths, 40))
    for i in range(30):
        kept = out.indices[out.indptr[i] : out.indptr[i + 1]]
        full = csr.indices[csr.indptr[i] : csr.indptr[i + 1]]
        assert np.all(np.diff(kept) > 0) and np.isin(kept, full).all()  # original order kept
        values = out.data[out.indptr[i] : out.indptr[i + 1]]
        np.testing.assert_array_equal(values, csr.data[csr.indptr[i] + np.searchsorted(full, kept)])
        if not truncated[i]:  # a short cell keeps every gene
            np.testing.assert_array_equal(kept, full)
    # Same cell (joinid), other batch composition and order -> same genes kept.
    rows = np.array([29, 3, 17])
    sub, _ = truncate_rows(select_rows(csr, rows), joinids[rows], 40, 0)
    ref = select_rows(out, rows)
    np.testing.assert_array_equal(sub.indices, ref.indices)
    other_seed, _ = truncate_rows(csr, joinids, 40, 1)
    assert not np.array_equal(other_seed.indices, out.indices)


def test_dataloader_passes_batches_through():
    batch = to_batch(random_csr())
    loader = torch.utils.data.DataLoader([batch], batch_size=None, num_workers=0)
    (out,) = list(loader)
    assert isinstance(out, CsrBatch) and torch.equal(out.counts, batch.counts)


def test_gather_positions_with_empty_rows():
    starts = np.array([5, 0, 9, 9, 2, 40], dtype=np.int64)
    lengths = np.array([3, 0, 2, 0, 4, 1], dtype=np.int64)
    expected = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
    positions, indptr = gather_positions(starts, lengths)
    np.testing.assert_array_equal(positions, expected)
    np.testing.assert_array_equal(indptr, np.concatenate([[0], np.cumsum(lengths)]))
    # leading empty row, and all rows empty
    positions, _ = gather_positions(np.array([3, 7]), np.array([0, 2]))
    np.testing.assert_array_equal(positions, [7, 8])
    assert len(gather_positions(np.array([3]), np.array([0]))[0]) == 0


@pytest.mark.parametrize("n_rows", [40, 1 << 21])  # packed-key sort, and the argsort fallback
def test_csr_from_sorted_coo_orders_any_input(n_rows):
    rng = np.random.default_rng(n_rows)
    ref = sp.random(40, 3000, density=0.05, format="csr", random_state=1, dtype=np.float32)
    ref.data = rng.integers(1, 500, ref.nnz).astype(np.float32)
    ref.data[:3] = [0.5, 1e-30, 3.4e38]  # any float32 bit pattern survives the packed key
    coo = ref.tocoo()
    rows = coo.row.astype(np.int64) * (n_rows // 40)  # spread rows over n_rows
    order = rng.permutation(coo.nnz)  # TileDB's unordered result
    csr = csr_from_sorted_coo(rows[order], n_rows, coo.col[order].astype(np.int32), coo.data[order])
    want = sp.csr_matrix((coo.data, (rows, coo.col)), shape=(n_rows, 3000))
    want.sort_indices()
    np.testing.assert_array_equal(csr.indptr, want.indptr)
    np.testing.assert_array_equal(csr.indices, want.indices)
    np.testing.assert_array_equal(csr.data, want.data)
    assert csr.indices.dtype == np.int32 and csr.data.dtype == np.float32


def test_row_sums_and_drop_zero_tokens_keep_library_exact():
    m = random_csr(n_rows=9, n_genes=30, density=0.3, seed=4)  # row 2 is empty
    m.indices[m.indices < 6] = 0  # genes outside the vocabulary carry token 0
    m = sp.csr_matrix((m.data, m.indices, m.indptr), shape=m.shape)  # keep explicit entries
    csr = as_csr(m)
    np.testing.assert_array_equal(row_sums(csr), np.asarray(m.sum(axis=1)).ravel())
    kept, removed = drop_zero_tokens(csr)
    assert removed == int((m.indices == 0).sum()) > 0
    for i in range(9):
        a, b = kept.indptr[i], kept.indptr[i + 1]
        row = m.indices[m.indptr[i] : m.indptr[i + 1]]
        np.testing.assert_array_equal(kept.indices[a:b], row[row != 0])
    assert drop_zero_tokens(kept) == (kept, 0)


def test_row_sums_are_the_float64_sums_rounded_once_even_past_2_to_24():
    """float32 summation is exact below 2^24; larger rows must not pick up its rounding."""
    rng = np.random.default_rng(0)
    small = rng.integers(1, 50, 3000).astype(np.float32)  # a UMI-like row, exact in float32
    big = np.full(4000, 16385.0, np.float32)  # sums to ~6.6e7 > 2^24, where float32 rounds
    big[::7] += 1.0  # odd values: a float32 running sum drops the ones
    data = np.concatenate([small, big, small[:10]])
    indptr = np.array([0, 3000, 3000, 7000, 7010], dtype=np.int64)
    csr = Csr(indptr, np.ones(len(data), np.int32), data)
    want = np.array(
        [data[a:b].astype(np.float64).sum() for a, b in zip(indptr[:-1], indptr[1:], strict=True)]
    )
    np.testing.assert_array_equal(row_sums(csr), want.astype(np.float32))
    naive = np.add.reduceat(big, [0])[0]  # what plain float32 accumulation gives for that row
    assert naive != np.float32(want[2])

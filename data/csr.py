"""Host CSR blocks and the vectorized kernels the stream applies to them.

Design: docs/loader.md, "Reading and the memory budget".

A read piece and a batch are `Csr` blocks: int64 indptr, int32 vocabulary tokens, float32
counts. The kernels build them from unordered COO reads, sum rows, drop genes outside the
vocabulary, locate the entries of selected rows and cap genes per row (`max_genes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atlasldm.data.split import splitmix64


@dataclass
class Csr:
    """Host CSR block: row i is `indices[indptr[i]:indptr[i+1]]` (int64 indptr)."""

    indptr: np.ndarray  # int64 (n+1,)
    indices: np.ndarray  # int32 (nnz,), vocabulary tokens
    data: np.ndarray  # float32 (nnz,)


def csr_from_sorted_coo(rows: np.ndarray, n_rows: int, cols: np.ndarray, vals: np.ndarray) -> Csr:
    """Return the CSR of COO entries with local row ids 0..n_rows-1, genes ascending per row.

    Entries are put in (row, col) order unless already in it, so the output never depends on the
    order TileDB returned them in. Unordered reads (Census tiling: one run per tile) are a few
    sorted runs, which a stable (tim)sort merges in near-linear time (a lexsort would pay a full
    sort per key). When row, col and the float32 value bits fit in 64 bits, they are sorted as
    one packed key, which avoids an argsort and three gathers over every entry.
    """
    vals = vals.astype(np.float32, copy=False)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    if len(rows) <= 1:
        return Csr(indptr, cols.astype(np.int32), vals)
    col_bits = max(int(cols.max()), 1).bit_length()
    if np.little_endian and n_rows.bit_length() + col_bits + 32 <= 64:
        # Built and unpacked in place: each fresh 8 B/nnz temporary costs a pass and page faults.
        key = np.empty(len(rows), dtype=np.uint64)
        np.left_shift(rows, col_bits, out=key, casting="unsafe")  # rows >= 0
        key |= cols.astype(np.int32, copy=False).view(np.uint32)  # tokens >= 0
        key <<= np.uint64(32)
        key |= vals.view(np.uint32)
        key.sort(kind="stable")  # timsort: one pass over sorted input, a merge of few runs
        halves = key.view(np.uint32).reshape(-1, 2)  # little-endian: (value bits, row|col)
        tokens = (halves[:, 1] & np.uint32((1 << col_bits) - 1)).view(np.int32)
        return Csr(indptr, tokens, halves[:, 0].copy().view(np.float32))
    key = rows.astype(np.int64) << 32  # (row, col) as one int64; cols < 2^32
    key |= cols
    if not np.all(key[1:] > key[:-1]):
        order = np.argsort(key, kind="stable")
        cols, vals = cols[order], vals[order]
    return Csr(indptr, cols.astype(np.int32, copy=False), vals)


EXACT_FLOAT32 = float(2**24)  # float32 holds every integer up to here, so integer sums are exact


def row_sums(csr: Csr) -> np.ndarray:
    """Return float32 (n,) per-row sums of `csr.data`.

    Summed in float32, which is exact for integer counts while a row's sum stays below 2^24
    (UMI libraries are far below) and 6x faster than a float64 reduceat, the largest cost of a
    direct read from an uncompressed file. Rows at or above 2^24 are summed again in float64.
    """
    lengths = np.diff(csr.indptr)
    sums = np.zeros(len(lengths), dtype=np.float32)
    nonempty = lengths > 0
    if len(csr.data):
        starts = csr.indptr[:-1][nonempty]
        sums[nonempty] = np.add.reduceat(csr.data, starts)
        for row in np.flatnonzero(sums >= EXACT_FLOAT32):
            lo, hi = csr.indptr[row], csr.indptr[row + 1]
            sums[row] = csr.data[lo:hi].sum(dtype=np.float64)
    return sums


def drop_zero_tokens(csr: Csr) -> tuple[Csr, int]:
    """Remove entries whose token is 0 (genes outside the vocabulary); return (CSR, removed)."""
    keep = csr.indices != 0
    removed = int(len(keep) - np.count_nonzero(keep))
    if not removed:
        return csr, 0
    rows = np.repeat(np.arange(len(csr.indptr) - 1), np.diff(csr.indptr))
    indptr = np.zeros_like(csr.indptr)
    np.cumsum(np.bincount(rows[keep], minlength=len(indptr) - 1), out=indptr[1:])
    return Csr(indptr, csr.indices[keep], csr.data[keep]), removed


def gather_positions(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (entry positions of rows given by starts/lengths, concatenated; new indptr)."""
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    total = int(indptr[-1])
    positions = np.repeat(starts - indptr[:-1], lengths) + np.arange(total, dtype=np.int64)
    return positions, indptr


def truncate_rows(
    csr: Csr, joinids: np.ndarray, max_genes: int, seed: int
) -> tuple[Csr, np.ndarray]:
    """Keep at most `max_genes` entries per row; return (CSR, bool mask of truncated rows).

    The kept genes are those with the smallest hash of (seed, joinid, token), so a cell keeps the
    same genes every epoch and on every rank; kept genes stay in ascending token order.
    """
    lengths = np.diff(csr.indptr)
    long_rows = np.flatnonzero(lengths > max_genes)
    truncated = np.zeros(len(lengths), dtype=bool)
    if len(long_rows) == 0:
        return csr, truncated
    truncated[long_rows] = True
    positions, sub_indptr = gather_positions(csr.indptr[long_rows], lengths[long_rows])
    local_row = np.repeat(np.arange(len(long_rows)), lengths[long_rows])
    cell_key = splitmix64(joinids[long_rows].astype(np.uint64) ^ splitmix64(np.uint64(seed)))
    score = splitmix64(cell_key[local_row] ^ csr.indices[positions].astype(np.uint64))
    order = np.lexsort((score, local_row))  # rows stay grouped, best scores first
    rank_in_row = np.empty(len(order), dtype=np.int64)
    rank_in_row[order] = np.arange(len(order)) - sub_indptr[local_row[order]]
    keep = np.ones(len(csr.indices), dtype=bool)
    keep[positions[rank_in_row >= max_genes]] = False
    new_lengths = np.minimum(lengths, max_genes)
    indptr = np.zeros_like(csr.indptr)
    np.cumsum(new_lengths, out=indptr[1:])
    return Csr(indptr, csr.indices[keep], csr.data[keep]), truncated

"""A rank's IO round: its read jobs, the read pieces located per emitted row, and its batches.

Design: docs/loader.md, "Reading and the memory budget".

A round's rows are read as sorted, contiguous runs (`read_jobs`), located in the read pieces in
emission order (`prepare_round`), and copied out of the pieces one batch at a time
(`gather_batch`), where `max_genes` is applied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from atlasldm.data.batch import CsrBatch
from atlasldm.data.csr import Csr, truncate_rows
from atlasldm.data.h5ad_source import H5adSource
from atlasldm.data.piece import Piece
from atlasldm.data.reader import CopySource, DirectSource
from atlasldm.data.sampler import RoundPlan

ROWS_PER_JOB = 4096  # at most about this many rows per read job


@dataclass
class PreparedRound:
    """One rank's round, read; its batches are copied out of the read pieces one by one.

    The pieces are never concatenated: a round-sized copy is a fresh allocation above glibc's
    mmap threshold, whose first-touch page faults cost time in proportion to the round's size.
    """

    plan: RoundPlan
    pieces: list[Piece]  # ascending joinids
    piece: np.ndarray  # int64 (n,), piece of each emitted row
    starts: np.ndarray  # int64 (n,), entry offset of each emitted row in its piece
    lengths: np.ndarray  # int64 (n,), expressed genes of each emitted row
    library: np.ndarray  # float32 (n,), emission order
    conditions: np.ndarray  # int64 (n, A), emission order
    joinids: np.ndarray  # int64 (n,), emission order
    bounds: np.ndarray  # int64 (n_batches + 1,), batch b is rows bounds[b]:bounds[b + 1]

    def __len__(self) -> int:
        return len(self.bounds) - 1


def concat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    """Concatenate `arrays`; one array is returned as is, none gives an empty `dtype` array."""
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def read_jobs(
    plan: RoundPlan,
    chunk_cells: int,
    reader_threads: int,
    read: Callable[[list[np.ndarray]], list[Piece]],
) -> list[Callable[[], list[Piece]]]:
    """Split the round's rows into jobs `read(runs)` of sorted, contiguous selection runs."""
    positions = np.unique(plan.rows)
    if len(positions) == 0:
        return []
    # A run may skip a few rows (a resumed round's consumed ones): one slice read beats
    # many small ones, and the reader drops rows it was not asked for.
    runs = np.split(positions, np.flatnonzero(np.diff(positions) > chunk_cells) + 1)
    # >= 2 jobs per thread for balance; <= ~ROWS_PER_JOB rows per job bounds the per-job arrays
    # and how long close() waits for a running job
    n_jobs = max(2 * reader_threads, -(-len(positions) // ROWS_PER_JOB), 1)
    starts = np.cumsum([0] + [len(r) for r in runs[:-1]])
    group = (starts * n_jobs) // len(positions)  # contiguous groups of ~equal rows
    return [partial(read, [runs[i] for i in np.flatnonzero(group == g)]) for g in np.unique(group)]


def prepare_round(
    plan: RoundPlan, pieces: list[Piece], source: CopySource | DirectSource | H5adSource
) -> PreparedRound:
    """Locate each emitted row (plan order) in the round's pieces; no entry is copied."""
    sizes = [len(p.joinids) for p in pieces]
    piece = np.repeat(np.arange(len(pieces), dtype=np.int64), sizes)
    starts = concat([p.csr.indptr[:-1] for p in pieces], np.int64)
    lengths = concat([np.diff(p.csr.indptr) for p in pieces], np.int64)
    wanted = source.ids(plan.rows)  # emission order
    rows = np.searchsorted(concat([p.joinids for p in pieces], np.int64), wanted)
    library, conditions = source.cell_meta(plan.rows)
    if library is None:
        library = concat([p.library_size for p in pieces], np.float32)[rows]
    bounds = np.concatenate([[0], np.cumsum(plan.batch_sizes)])
    return PreparedRound(
        plan, pieces, piece[rows], starts[rows], lengths[rows], library, conditions, wanted, bounds
    )


def gather_batch(
    prepared: PreparedRound,
    index: int,
    condition_names: tuple[str, ...],
    max_genes: int,
    seed: int,
) -> tuple[CsrBatch, int]:
    """Copy batch `index` out of the round's pieces (a memcpy per row), then apply `max_genes`.

    Returns (batch, cells cut to `max_genes`); `seed` keys the genes kept (`truncate_rows`).
    """
    s, e = prepared.bounds[index], prepared.bounds[index + 1]
    ends = prepared.starts[s:e] + prepared.lengths[s:e]
    spans = list(
        zip(prepared.piece[s:e].tolist(), prepared.starts[s:e].tolist(), ends.tolist(), strict=True)
    )
    csrs = [p.csr for p in prepared.pieces]
    indices = concat([csrs[j].indices[a:b] for j, a, b in spans], np.int32)
    data = concat([csrs[j].data[a:b] for j, a, b in spans], np.float32)
    indptr = np.zeros(e - s + 1, dtype=np.int64)
    np.cumsum(prepared.lengths[s:e], out=indptr[1:])
    joinids = prepared.joinids[s:e]
    csr, cut = truncate_rows(Csr(indptr, indices, data), joinids, max_genes, seed)
    batch = CsrBatch.from_numpy(
        csr.indices,
        csr.data,
        csr.indptr,
        prepared.library[s:e],
        prepared.conditions[s:e],
        condition_names,
        joinids,
    )
    return batch, int(cut.sum())

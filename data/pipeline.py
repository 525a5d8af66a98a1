"""Thread pipeline and vectorized CSR kernels of the stream.

Design: docs/loader.md, "Reading and the memory budget".

Each rank runs reader threads (TileDB and numpy release the GIL) plus one assembler thread.
Rounds are submitted `prefetch_rounds` ahead but yielded strictly in plan order, so the output
never depends on timing. With `reader_threads=0` everything runs synchronously in the caller.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from atlasldm.data.split import splitmix64

log = logging.getLogger(__name__)
P = TypeVar("P")
R = TypeVar("R")

# Bytes a round holds per nnz: its read pieces (int32 token, float32 count). Batches are copied
# out of them a few at a time and the Arrow buffers of a read live for one chunk only; the
# budget keeps half of the memory for those, side arrays, Python and torch
# (docs/loader.md, "Reading and the memory budget").
BYTES_PER_NNZ = 8
# Cells per rank per IO round at most, when K is derived. A round's first batch waits for the
# whole round to be read, so this bounds the first batch after a (re)start: ~3 s for 24,576
# cells of a Census-layout experiment on 2 cores (README, loader benchmark).
MAX_ROUND_CELLS = 24576
BATCH_LOOKAHEAD = 4  # batches gathered ahead of the consumer


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
    sorted runs, which a stable (tim)sort merges in near-linear time; lexsort took 10 s on 23M.
    When row, col and the float32 value bits fit in 64 bits, they are sorted as one packed key,
    which avoids an argsort and three gathers (half the time on 512 Census rows).
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


def row_sums(csr: Csr) -> np.ndarray:
    """Return float32 (n,) per-row sums of `csr.data`, accumulated in float64."""
    lengths = np.diff(csr.indptr)
    sums = np.zeros(len(lengths), dtype=np.float64)
    nonempty = lengths > 0
    if len(csr.data):
        starts = csr.indptr[:-1][nonempty]
        sums[nonempty] = np.add.reduceat(csr.data, starts, dtype=np.float64)
    return sums.astype(np.float32)


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


def gather_rows(csr: Csr, rows: np.ndarray) -> Csr:
    """Return the CSR of `rows` of `csr`, in that order (one vectorized gather)."""
    starts = csr.indptr[rows]
    positions, indptr = gather_positions(starts, csr.indptr[rows + 1] - starts)
    return Csr(indptr, csr.indices[positions], csr.data[positions])


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


def chunks_per_rank_from_budget(
    mean_nnz: float,
    chunk_cells: int,
    micro_batch: int,
    budget_gb: float,
    prefetch_rounds: int,
    max_chunks: int | None = None,
) -> int:
    """Return K so that the rounds in flight fit half the per-rank memory budget.

    In flight: the round being emitted, one being assembled and `prefetch_rounds` being read.
    The other half of the budget is left for side arrays, Python and torch. A round is also
    capped at MAX_ROUND_CELLS per rank: its first batch waits for the whole round to be read, so
    this bounds the time to the first batch after a (re)start; `max_chunks` (the stream passes
    full chunks // W) keeps at least one full round when the data allow. K is a multiple of
    micro_batch / gcd(micro_batch, C), so K*C is a multiple of the micro-batch.
    """
    bytes_per_chunk = BYTES_PER_NNZ * max(mean_nnz, 1.0) * chunk_cells + 64 * chunk_cells
    k = int(0.5 * budget_gb * 1e9 / ((prefetch_rounds + 2) * bytes_per_chunk))
    k = min(k, MAX_ROUND_CELLS // chunk_cells, max_chunks or k)
    step = micro_batch // math.gcd(micro_batch, chunk_cells)
    return max(step, k // step * step)


class Metrics:
    """Thread-safe counters and timers; `snapshot()` returns a plain dict."""

    def __init__(self, **static: Any):
        self._lock = threading.Lock()
        self._values: dict[str, Any] = dict(static)

    def add(self, **deltas: float) -> None:
        """Add each value to its counter (creating it at 0)."""
        with self._lock:
            for key, value in deltas.items():
                self._values[key] = self._values.get(key, 0) + value

    def set(self, **values: Any) -> None:
        """Overwrite values."""
        with self._lock:
            self._values.update(values)

    def snapshot(self) -> dict[str, Any]:
        """Return a copy of all counters."""
        with self._lock:
            return dict(self._values)


class RoundPipeline:
    """Reader threads for each round's read jobs, one thread that prepares rounds from their
    pieces, and one that gathers batches a few ahead of the consumer (`lookahead`).

    Batches are gathered one at a time rather than a whole round up front: the first batch of a
    round waits for its reads and one gather only, and at most BATCH_LOOKAHEAD gathered batches
    exist beside the prepared rounds.
    """

    def __init__(self, reader_threads: int, prefetch_rounds: int):
        self.reader_threads = reader_threads
        self.prefetch_rounds = prefetch_rounds
        self._io: ThreadPoolExecutor | None = None
        self._asm: ThreadPoolExecutor | None = None
        self._gather: ThreadPoolExecutor | None = None

    def _pools(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor, ThreadPoolExecutor]:
        if self._io is None or self._asm is None or self._gather is None:
            self._io = ThreadPoolExecutor(self.reader_threads, thread_name_prefix="soma-read")
            self._asm = ThreadPoolExecutor(1, thread_name_prefix="round-prepare")
            # Its own thread: a prepare task blocks on its reads and must not stall gathers.
            self._gather = ThreadPoolExecutor(1, thread_name_prefix="batch-gather")
        return self._io, self._asm, self._gather

    def lookahead(self, gather: Callable[[int], R], count: int) -> Iterator[R]:
        """Yield gather(0), ..., gather(count - 1), computing up to BATCH_LOOKAHEAD ahead."""
        if self.reader_threads == 0:
            yield from (gather(i) for i in range(count))
            return
        pool = self._pools()[2]
        pending: deque[Future] = deque(
            pool.submit(gather, i) for i in range(min(BATCH_LOOKAHEAD, count))
        )
        try:
            for nxt in range(BATCH_LOOKAHEAD, count + BATCH_LOOKAHEAD):
                result = pending.popleft().result()
                if nxt < count:
                    pending.append(pool.submit(gather, nxt))
                yield result
        finally:
            for future in pending:  # abandoned iteration
                future.cancel()

    def map_rounds(
        self,
        plans: Iterable[P],
        jobs: Callable[[P], list[Callable[[], Any]]],
        assemble: Callable[[P, list[Any]], R],
    ) -> Iterator[R]:
        """Yield `assemble(plan, [job() for job in jobs(plan)])` for each plan, in order."""
        if self.reader_threads == 0:
            for plan in plans:
                yield assemble(plan, [job() for job in jobs(plan)])
            return
        io, asm, _ = self._pools()

        def launch(plan: P) -> Future:
            futures = [io.submit(job) for job in jobs(plan)]
            # The assembler only waits on reader futures already queued: no pool deadlock.
            return asm.submit(lambda: assemble(plan, [f.result() for f in futures]))

        pending: deque[Future] = deque()
        source = iter(plans)
        try:
            for plan in source:
                pending.append(launch(plan))
                if len(pending) > self.prefetch_rounds:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # abandoned iteration: drop rounds not yet started
                future.cancel()

    def close(self) -> None:
        """Cancel queued work and wait for the running jobs (at most one per thread).

        Not waiting would leave prefetch reads running after close, taking CPU from whatever
        runs next (a resumed stream's first round read ~1.5 s slower beside them).
        """
        for pool in (self._io, self._asm, self._gather):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._io = self._asm = self._gather = None

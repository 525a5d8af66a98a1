"""The timed loop of the loader benchmark, shared by every loader (ours and the peers).

This module imports only the standard library and numpy: the annbatch worker
(:mod:`.loader_peers_annbatch`) runs it by file path in its own Python >= 3.12 venv, where the
project is not installed. A loader is an iterator of `(cells, nonzeros, dataset codes)` per
mini-batch; the codes of every timed batch are saved to `codes_out` (.npz: `labels`, `sizes`)
and the parent scores their diversity (:func:`atlasldm.bench.diversity.batch_entropies`).
"""

from __future__ import annotations

import itertools
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 256  # cells per mini-batch, every loader


def peak_rss_gb() -> float:
    """This process's peak RSS in GiB: VmHWM of its own address space.

    getrusage's ru_maxrss survives fork and exec, so a worker started by a parent that once held
    more memory (e.g. while building a row store) would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Codes:
    """Label codes of the timed batches, in emission order, as one int32 array per batch."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []

    def add(self, codes: Any) -> None:
        """Record one batch's labels (any integer array-like)."""
        self.parts.append(np.asarray(codes, dtype=np.int32))

    def save(self, path: str) -> None:
        """Write `labels` (concatenated) and `sizes` (cells per batch) to `path` (.npz)."""
        sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        labels = np.concatenate(self.parts) if self.parts else np.zeros(0, np.int32)
        np.savez(path, labels=labels, sizes=sizes)


# Yielded by a loader's batch stream after each epoch (see `over_epochs`).
EPOCH_END = None


def over_epochs(start_epoch: Callable[[int], Iterable]) -> Iterator:
    """The batches of epochs 0, 1, 2, ... of one loader object, EPOCH_END after each.

    `start_epoch(e)` begins epoch e the way the loader's API does it (set_epoch, or a new pass of
    the same object), so a later epoch pays only what a training run pays at each epoch: not
    the process's one-off costs (imports, JIT compilation, opening the store). Ends after an
    epoch without batches (an empty shard).
    """
    for epoch in itertools.count():
        empty = True
        for batch in start_epoch(epoch):
            empty = False
            yield batch
        yield EPOCH_END
        if empty:
            return


class _Clock:
    """Wall and process CPU time at a moment; `since()` is what has passed from it."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def since(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_batches(
    batches: Iterator,
    max_cells: int,
    seconds: float,
    codes_out: str = "",
    epoch_seconds: float = 0.0,
) -> dict[str, Any]:
    """Time a loader's batches until `max_cells` timed cells or `seconds`, across epochs.

    The first batch is not timed: `first_batch_s` runs from the first `next()` (which constructs
    the loader: every loader's generator builds it lazily) to the first batch. The window then
    runs on across epoch ends (EPOCH_END items), as a training run's stream does.

    `epoch_*` time the second epoch whole (`second_epoch`). With `epoch_seconds` > 0 the loader
    runs on after the window until that epoch has ended, or until it cannot end within
    `epoch_seconds` of the start (`may_end`; then the `epoch_*` figures are None).
    """
    start, warm, window = _Clock(), None, None
    cells = nnz = n_batches = 0
    codes = Codes()
    ends: list[_Clock] = []  # the clock at each epoch's end
    epoch_cells = [0]
    for item in batches:
        if item is EPOCH_END:
            ends.append(_Clock())
            epoch_cells.append(0)
        else:
            n_cells, n_nnz, batch_codes = item
            epoch_cells[-1] += n_cells
            if warm is None:  # the first batch pays start-up; time the steady state after it
                warm = _Clock()
            elif window is None:
                cells, nnz, n_batches = cells + n_cells, nnz + n_nnz, n_batches + 1
                codes.add(batch_codes)
            if window is None and (cells >= max_cells or warm.since()[0] > seconds):
                window = warm.since()
        if window is not None and (len(ends) >= 2 or not may_end(start, ends, epoch_seconds)):
            break
    warm = warm or _Clock()  # no batch at all (a rank whose shard is empty): a row of zeros
    wall, cpu = window or warm.since()
    close = getattr(batches, "close", None)
    if close is not None:
        close()
    if codes_out:
        codes.save(codes_out)
    nnz = max(nnz, 0)  # dense runs count none: the caller fills nnz/s from the sparse run
    return {
        "cells": cells,
        "batches": n_batches,
        "nnz": nnz,
        "seconds": wall,
        "cells_per_s": cells / wall if wall > 0 else 0.0,
        "nnz_per_cpu_s": nnz / cpu if cpu > 0 else 0.0,
        "cpu_seconds": cpu,
        "first_batch_s": warm.wall - start.wall,
        "peak_rss_gb": peak_rss_gb(),
        **second_epoch(ends, epoch_cells),
    }


def may_end(start: _Clock, ends: list[_Clock], epoch_seconds: float) -> bool:
    """Whether the second epoch may still end within `epoch_seconds` of the start.

    It lasts about as long as the first, less one-off costs: so not if the first has not ended
    by half the time (a large corpus then stops soon after its window instead of waiting).
    """
    elapsed = start.since()[0]
    return elapsed <= epoch_seconds and (bool(ends) or elapsed <= epoch_seconds / 2)


def second_epoch(ends: list[_Clock], epoch_cells: list[int]) -> dict[str, float | None]:
    """`epoch_*` figures of the second epoch (None unless both of its ends were seen).

    It runs from the end of the first epoch to its own: every read of an epoch, its first read
    included, and none of the process's one-off costs. Loaders that read in large I/O batches
    deliver much of an epoch from memory after a long first read, so on a corpus not much
    larger than one I/O batch a window after the first batch holds few of their reads; a whole
    epoch holds them all.
    """
    keys = ("epoch_cells", "epoch_seconds", "epoch_cpu_seconds", "epoch_cells_per_s")
    if len(ends) < 2 or not epoch_cells[1]:
        return dict.fromkeys(keys)
    wall, cpu = ends[1].wall - ends[0].wall, ends[1].cpu - ends[0].cpu
    rate = epoch_cells[1] / wall if wall > 0 else 0.0
    return dict(zip(keys, (epoch_cells[1], wall, cpu, rate), strict=True))


def first_ids(make_epoch: Callable[[int], Iterator[np.ndarray]], epoch: int) -> np.ndarray:
    """The cell ids of the first batch of `epoch` (`make_epoch(epoch)` yields ids per batch)."""
    it = make_epoch(epoch)
    try:
        return np.asarray(next(it))
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def order_differs(epoch_ids: Callable[[int], Iterator[np.ndarray]]) -> bool:
    """Whether epochs 0 and 1 of one loader object start with different cells.

    `epoch_ids(k)` starts epoch k the way the loader's API does it (our stream: `set_epoch`;
    the peers: a second iteration of the same object, which advances their epoch or RNG).
    """
    first, second = first_ids(epoch_ids, 0), first_ids(epoch_ids, 1)
    return not np.array_equal(np.sort(first), np.sort(second))

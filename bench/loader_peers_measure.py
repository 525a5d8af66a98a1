"""The timed loop of the loader benchmark, shared by every loader (ours and the peers).

This module imports only the standard library and numpy: the annbatch worker
(:mod:`.loader_peers_annbatch`) runs it by file path in its own Python >= 3.12 venv, where the
project is not installed. A loader is an iterator of `(cells, nonzeros, dataset codes)` per
mini-batch; the codes of every timed batch are saved to `codes_out` (.npz: `labels`, `sizes`)
and the parent scores their diversity (:func:`atlasldm.bench.diversity.batch_entropies`).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
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


def time_batches(
    batches: Iterator, max_cells: int, seconds: float, codes_out: str = ""
) -> dict[str, Any]:
    """Iterate until `max_cells` timed cells or `seconds`; the first batch is not timed.

    `first_batch_s` runs from the first `next()` (which constructs the loader: every loader's
    generator builds it lazily) to the first batch.
    """
    cells = nnz = n_batches = 0
    codes = Codes()
    t_start = time.perf_counter()
    t_warm = cpu_warm = None
    for n_cells, n_nnz, batch_codes in batches:
        if t_warm is None:  # the first batch pays start-up; time the steady state after it
            t_warm, cpu_warm = time.perf_counter(), time.process_time()
        else:
            cells, nnz, n_batches = cells + n_cells, nnz + n_nnz, n_batches + 1
            codes.add(batch_codes)
        if cells >= max_cells or time.perf_counter() - t_warm > seconds:
            break
    if t_warm is None:  # no batch at all (a rank whose shard is empty): a row of zeros
        t_warm, cpu_warm = time.perf_counter(), time.process_time()
    wall, cpu = time.perf_counter() - t_warm, time.process_time() - cpu_warm
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
        "first_batch_s": t_warm - t_start,
        "peak_rss_gb": peak_rss_gb(),
    }


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

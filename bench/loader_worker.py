"""One measured run of the loader benchmark: one loader on one experiment, in a fresh process.

Started by :mod:`atlasldm.bench.loader` as `python -m atlasldm.bench.loader worker ...`. The
optional `tiledbsoma_ml` is imported here only, and only for its own runs.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from atlasldm.bench.diversity import batch_entropy

BATCH = 256  # cells per mini-batch, both loaders
ML_IO = 65536  # tiledbsoma-ml's default io_batch_size
RESUME_AT = (0.05, 0.37, 0.71, 0.98)  # epoch fractions of the resume latencies


def _ml_batches(args: argparse.Namespace) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (cells, nnz, dataset codes) per tiledbsoma-ml mini-batch (nnz -1 when dense)."""
    import tiledbsoma
    from tiledbsoma_ml import ExperimentDataset

    sparse = not args.dense
    exp = tiledbsoma.Experiment.open(args.uri)
    ds = ExperimentDataset(
        exp.axis_query("RNA"),
        layer_name="raw",
        obs_column_names=["dataset_id"],
        batch_size=BATCH,
        io_batch_size=args.io_batch,
        shuffle=True,
        shuffle_chunk_size=64,
        seed=args.seed,
        return_sparse_X=sparse,
    )
    vocab: dict[str, int] = {}
    for X, obs in ds:
        codes = np.array([vocab.setdefault(v, len(vocab)) for v in obs["dataset_id"]])
        # Counting a dense batch's nonzeros would be timed work tiledbsoma-ml never does.
        yield X.shape[0], (X.nnz if sparse else -1), codes


def our_stream(args: argparse.Namespace) -> Any:
    """Our CellStream over the whole experiment, as the worker's options describe it."""
    from atlasldm.data.config import DataConfig
    from atlasldm.data.stream import CellStream

    cfg = DataConfig(
        source=args.uri,
        mode=args.mode,
        vocab_path=args.vocab if args.mode == "direct" else "",
        condition_columns=["dataset_id"],
        micro_batch=BATCH,
        seed=args.seed,
        reader_threads=args.threads,
        unknown_genes="drop",
        row_store=args.row_store,
    )
    return CellStream(cfg, split="all", rank=0, world_size=1)


def _our_batches(args: argparse.Namespace) -> Iterator[tuple[int, int, np.ndarray]]:
    stream = our_stream(args)
    try:
        for b in stream:
            yield b.num_cells, b.num_tokens, b.conditions[:, 0].numpy()
    finally:  # stop prefetching before the resume timings
        stream.close()


def resume_latency(args: argparse.Namespace) -> list[float]:
    """Seconds from constructing a stream and restoring a mid-epoch state to its first batch."""
    probe = our_stream(args)
    n, state = len(probe), probe.state_dict()
    probe.close()
    latencies = []
    for frac in RESUME_AT:
        t0 = time.perf_counter()
        stream = our_stream(args)
        stream.load_state_dict({**state, "batch_in_epoch": int(frac * (n - 1))})
        next(iter(stream))
        latencies.append(time.perf_counter() - t0)
        stream.close()
    return latencies


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


def time_batches(batches: Iterator, max_cells: int, seconds: float) -> dict[str, Any]:
    """Iterate until `max_cells` timed cells or `seconds`; the first batch is not timed."""
    cells = nnz = 0
    entropies: list[float] = []
    t_start = time.perf_counter()
    t_warm = cpu_warm = None
    for n_cells, n_nnz, codes in batches:
        if t_warm is None:  # the first batch pays start-up; time the steady state after it
            t_warm, cpu_warm = time.perf_counter(), time.process_time()
        else:
            cells, nnz = cells + n_cells, nnz + n_nnz
        entropies.append(batch_entropy(codes))
        if cells >= max_cells or time.perf_counter() - t_warm > seconds:
            break
    wall, cpu = time.perf_counter() - t_warm, time.process_time() - cpu_warm
    batches.close()
    nnz = max(nnz, 0)  # dense runs: the caller fills nnz/s from the sparse run's nnz per cell
    return {
        "cells": cells,
        "nnz": nnz,
        "seconds": wall,
        "cells_per_s": cells / wall,
        "nnz_per_cpu_s": nnz / cpu,
        "cpu_seconds": cpu,
        "first_batch_s": t_warm - t_start,
        "entropy": float(np.mean(entropies)),
        "peak_rss_gb": peak_rss_gb(),
    }


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time one loader on one experiment; returns its figures (run in a fresh process)."""
    import atlasldm.data.stream  # noqa: F401  (torch and TileDB imports are not the loader's start-up)

    batches = _ml_batches(args) if args.loader == "ml" else _our_batches(args)
    out = time_batches(batches, args.max_cells, args.seconds)
    if args.loader == "ours":
        out["resume_first_batch_s"] = resume_latency(args)
    return out

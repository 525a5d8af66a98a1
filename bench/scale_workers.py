"""Measured processes of the scale benchmark: one stream rank, timed or probed for flatness.

Started by :mod:`atlasldm.bench.scale_stream` as `python -m atlasldm.bench.scale worker-time|
worker-flat ...` (or run in the parent with `--inline`); each prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from atlasldm.bench.diversity import RandomEntropy, batch_entropies
from atlasldm.data.config import DataConfig

# /proc/self/status line -> report key (GiB)
MEMORY_KEYS = {
    "VmHWM:": "peak_rss_gb",
    "VmRSS:": "rss_gb",
    "RssAnon:": "rss_anon_gb",
    "RssFile:": "rss_file_gb",
}


def proc_memory() -> dict[str, float]:
    """VmHWM (peak RSS), VmRSS, RssAnon and RssFile of this process, GiB."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0] + ":"
            if key in MEMORY_KEYS:
                out[MEMORY_KEYS[key]] = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return out


def stream_config(args: argparse.Namespace) -> DataConfig:
    """The DataConfig of a worker's stream, from its command line."""
    return DataConfig(
        source=args.source,
        mode=args.mode,
        vocab_path=args.vocab if args.mode == "direct" else "",
        condition_columns=["dataset_id"],
        micro_batch=args.micro_batch,
        seed=args.seed,
        reader_threads=args.threads,
        memory_budget_gb=args.memory_budget_gb,
        chunk_cells=args.chunk_cells,
    )


def _barrier(folder: str, rank: int, world_size: int, timeout: float = 900.0) -> None:
    """Wait until every rank has written its ready file in `folder`."""
    Path(folder, f"ready_{rank}").write_text("")
    deadline = time.monotonic() + timeout
    while sum(Path(folder, f"ready_{r}").exists() for r in range(world_size)) < world_size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks did not all start within {timeout} s")
        time.sleep(0.01)


def _epochs(stream: Any, epochs: int) -> Iterator:
    """Yield the stream's batches of `epochs` consecutive epochs."""
    for _ in range(epochs):
        yield from stream


def time_epochs(stream: Any, args: argparse.Namespace, cpu_start: float) -> dict[str, Any]:
    """Iterate up to max cells / seconds; the first batch pays the first round's read and is
    not timed. `cpu_start` is the CPU clock used when not even one batch came."""
    rand = RandomEntropy(np.array(json.loads(args.label_counts)), seed=args.seed)
    n_labels = len(rand.counts) + 1  # + the null code
    t_start = time.perf_counter()
    t_warm = cpu_warm = first_batch_s = wall_start = None
    cells = nnz = batches = 0
    ratios: list[float] = []
    for batch in _epochs(stream, args.epochs):
        if t_warm is None:
            t_warm, cpu_warm = time.perf_counter(), time.process_time()
            first_batch_s, wall_start = t_warm - t_start, time.time()
        else:
            cells, nnz, batches = cells + batch.num_cells, nnz + batch.num_tokens, batches + 1
        codes = batch.conditions[:, 0].numpy()
        size = np.array([len(codes)])
        ratios.extend(rand.ratios(batch_entropies(codes, size, n_labels), size).tolist())
        over = args.max_cells and cells >= args.max_cells
        if over or time.perf_counter() - t_warm > args.seconds:
            break
    wall = time.perf_counter() - (t_warm or t_start)
    return {
        "first_batch_s": first_batch_s,
        "cells": cells,
        "nnz": nnz,
        "batches": batches,
        "seconds": wall,
        "cells_per_s": cells / wall if wall > 0 else 0.0,
        "timed_from": wall_start,
        "timed_to": time.time(),
        "cpu_seconds": time.process_time() - (cpu_warm or cpu_start),
        "diversity": float(np.mean(ratios)) if ratios else None,
    }


def worker_time(args: argparse.Namespace) -> dict[str, Any]:
    """One rank of a timing run: construct, barrier, iterate up to max cells / seconds."""
    from atlasldm.data.stream import CellStream

    t0, c0 = time.perf_counter(), time.process_time()
    cfg = stream_config(args)
    stream = CellStream(cfg, args.split, rank=args.rank, world_size=args.world_size)
    construct_s = time.perf_counter() - t0
    if args.barrier:
        _barrier(args.barrier, args.rank, args.world_size)
    timed = time_epochs(stream, args, c0)
    stream.close()
    diversity = timed.pop("diversity")
    return {
        "rank": args.rank,
        "world_size": args.world_size,
        "construct_s": construct_s,
        **timed,
        "cpu_seconds_total": time.process_time() - c0,
        "diversity": diversity,
        "batches_per_epoch": len(stream),
        **proc_memory(),
    }


def flat_resume(stream: Any, state_file: Path, t0: float) -> dict[str, Any]:
    """Restore the saved mid-epoch state; time it to the first batch and check that batch."""
    state = json.loads(state_file.read_text())
    t1 = time.perf_counter()
    stream.load_state_dict(state["state"])
    batch = next(iter(stream))
    t2 = time.perf_counter()
    ids = batch.soma_joinid[:16].tolist()
    stream.close()
    return {
        "load_to_first_batch_s": t2 - t1,
        "resume_total_s": t2 - t0,
        "resume_matches": ids == state["next_joinids"],
        **proc_memory(),
    }


def flat_start(stream: Any, args: argparse.Namespace, t0: float) -> dict[str, Any]:
    """Start-up and steady memory; then save the mid-epoch state and the next batch's cells."""
    it = iter(stream)
    next(it)
    out: dict[str, Any] = {"startup_s": time.perf_counter() - t0}  # construction to 1st batch
    done = 1
    while done <= args.batches and next(it, None) is not None:
        done += 1
    out["steady_batches"] = done
    out.update(proc_memory())  # peak RSS after start-up and `batches` steady batches
    # Walk to mid-epoch through the public API, save the position and the next batch's cells.
    t1 = time.perf_counter()
    mid = len(stream) // 2
    while done < mid and next(it, None) is not None:
        done += 1
    out["walk_to_mid_s"] = time.perf_counter() - t1
    state = stream.state_dict()
    out["mid_batch"], out["state_dict_chars"] = done, len(json.dumps(state))
    nxt = next(it, None)
    half = proc_memory()  # file-backed pages of the row store count in RSS (RssFile)
    for key in ("peak_rss_gb", "rss_anon_gb", "rss_file_gb"):
        out[f"half_epoch_{key}"] = half.get(key)
    stream.close()
    next_ids = [] if nxt is None else nxt.soma_joinid[:16].tolist()
    Path(args.state_file).write_text(json.dumps({"state": state, "next_joinids": next_ids}))
    return out


def worker_flat(args: argparse.Namespace) -> dict[str, Any]:
    """Fresh-process measures of one stream: start-up and steady memory, or a resume."""
    from atlasldm.data.stream import CellStream

    cfg = stream_config(args)
    t0 = time.perf_counter()
    stream = CellStream(cfg, args.split, rank=0, world_size=1)
    out: dict[str, Any] = {
        "construct_s": time.perf_counter() - t0,
        "batches_per_epoch": len(stream),
        "constructed_rss_gb": proc_memory().get("rss_gb"),
    }
    if args.phase == "resume":
        return out | flat_resume(stream, Path(args.state_file), t0)
    return out | flat_start(stream, args, t0)


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measured process a parsed `worker-time` / `worker-flat` command line names."""
    if args.command == "worker-time":
        return worker_time(args)
    return worker_flat(args)

"""What the loop records after each step: metrics averaged over ranks, throughput (and MFU), peak
memory, written to the tracker and, at full precision, to `<run_dir>/metrics.jsonl`."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from atlasldm.train.disk_space import OutputWriteError, append_line, describe_write_failure
from atlasldm.train.distributed import all_reduce_mean, any_rank, is_main, world_size
from atlasldm.train.throughput import throughput_metrics
from atlasldm.train.training_run import TrainingRun


def peak_memory_mb(device: torch.device) -> float:
    """Return the peak memory of this rank so far: the device's on a GPU, the process's on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux (bytes on macOS); the host process is what a CPU rank uses.
    scale = 1.0 if sys.platform != "darwin" else 1.0 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024


def _cell_means(mean: dict) -> None:
    """Turn the rank-averaged per-cell sums of `train/*` into means over the step's cells."""
    cells = mean["cells"]  # ratio of rank means = ratio of sums
    for key in [k for k in mean if k.startswith("train/")]:
        # NaN rather than 0.0 when no rank had a cell: there is no loss to report
        mean[key] = mean[key] / cells if cells > 0 else float("nan")


def log_step(training: TrainingRun, local: dict, peak: float | None, skipped: bool = False) -> None:
    """All-reduce the step's metrics, derive throughput (and MFU against `peak` TFLOP/s per
    device), and write them (rank 0); collective.

    A skipped step (non-finite loss, no update) has no loss to report: its `train/*` values are
    left out and the record says `"skipped": true`, so no plot shows a fake 0.0.
    """
    state = training.state
    mean = all_reduce_mean(local)
    _cell_means(mean)
    if skipped:
        for key in [k for k in mean if k.startswith("train/")]:
            del mean[key]
    world = world_size()
    cells, tokens, seconds = mean.pop("cells") * world, mean.pop("tokens") * world, mean["seconds"]
    flops = mean.pop("flops") * world
    if flops > 0:
        mean.update(throughput_metrics(flops, seconds, world, peak))
    state.cells_seen += int(round(cells))
    mean.update(
        {
            "perf/tokens_per_s": tokens / max(seconds, 1e-9),
            "perf/data_wait_frac": mean.pop("wait") / max(seconds, 1e-9),
            "perf/step_s": mean.pop("seconds"),
            "perf/peak_mem_mb": peak_memory_mb(training.engine.device),
            "cells_seen": float(state.cells_seen),
        }
    )
    logged = {**mean, "train/skipped": 1.0} if skipped else mean
    training.tracker.log(logged, state.step, cells=int(round(cells)))
    record = {"step": state.step, **({"skipped": True} if skipped else {}), **mean}
    append_metrics(training.run_dir, record)


def append_metrics(run_dir: Path, record: dict) -> None:
    """Append `record` to the full-precision metric history (rank 0); collective on all ranks.

    Every rank learns whether the write failed (a full disk), so all stop together instead of
    the others waiting for rank 0 in the next collective.
    """
    path, line, error = run_dir / "metrics.jsonl", json.dumps(record) + "\n", None
    if is_main():
        try:
            append_line(path, line)
        except OSError as exc:
            error = exc
    if any_rank(error is not None):
        reason = error or OSError("rank 0 failed to write it")
        raise OutputWriteError(describe_write_failure("appending to", path, reason, len(line)))

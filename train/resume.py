"""Resuming from a checkpoint: which tag (verified by rank 0 first), a world-size change, and
loading the engine, RNG and EMA state. The tags themselves are written by `train/checkpoint.py`.

A world-size change is detected from the saved world size and handled with DeepSpeed universal
checkpointing: rank 0 converts the tag with `deepspeed.checkpoint.ds_to_universal` into
`checkpoints/universal/<tag>/` and the engine, built with `checkpoint.load_universal`, loads it.
Checked on DeepSpeed 0.19.8 (CPU, gloo): ZeRO-2 2 -> 1 -> 2 and ZeRO-3 2 -> 1 ranks match the
uninterrupted run to ~1e-7, after undoing two ZeRO-3 universal-load defects (see
`_repair_universal_load`). The conversion assumes the run folder is on a shared filesystem.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atlasldm.train.checkpoint import FORMAT_VERSION, checkpoints_dir
from atlasldm.train.checkpoint_files import (
    COMPLETE,
    CheckpointError,
    atomic_write_bytes,
    check_explicit_tag,
    complete_tags,
    read_complete,
    read_latest,
    select_auto_tag,
)
from atlasldm.train.disk_space import one_line
from atlasldm.train.distributed import all_reduce_min, is_main, rank


@dataclass
class ResumePoint:
    """Where and how to resume."""

    tag: str  # checkpoint tag, e.g. step_0000012
    folder: Path  # the original tag folder (ema.pt, rng_rank<r>.pt, COMPLETE)
    load_dir: Path  # folder given to engine.load_checkpoint (checkpoints/ or .../universal/)
    saved_world: int  # world size that wrote the checkpoint
    universal: bool  # True when the world size changed: load the universal conversion


def find_resume(run_dir: str | Path, resume: str, world: int) -> ResumePoint | None:
    """Return the checkpoint to resume from per `resume` ("auto", "never" or a tag), or None.

    Reads the tag as it stands; `prepare_resume` verifies it (and falls back) first.

    Raises:
        CheckpointError: an explicit or `latest` tag is missing or incomplete.
    """
    ckpt_dir = checkpoints_dir(run_dir)
    if resume == "never":
        return None
    tag = read_latest(ckpt_dir) if resume == "auto" else resume
    if tag is None:
        return None
    folder = ckpt_dir / tag
    if not (folder / COMPLETE).is_file():
        known = [t for _, t in complete_tags(ckpt_dir)]
        raise CheckpointError(
            f"checkpoint {tag} in {ckpt_dir} is missing or incomplete (no {COMPLETE} marker); "
            f"complete tags: {known or 'none'}. Set checkpoint.resume to one of them, or "
            "checkpoint.resume=never to start afresh"
        )
    saved_world = read_complete(folder)["world_size"]
    universal = saved_world != world
    load_dir = ckpt_dir / "universal" if universal else ckpt_dir
    return ResumePoint(tag, folder, load_dir, saved_world, universal)


def _verify_on_main(ckpt_dir: Path, resume: str) -> None:
    """Rank 0: check the tag to resume from; under "auto", fall back past corrupt tags."""
    if resume == "auto":
        select_auto_tag(ckpt_dir)  # repoints `latest` when it falls back
    elif resume != "never":
        check_explicit_tag(ckpt_dir, resume)


def _convert_to_universal(point: ResumePoint) -> None:
    out = point.load_dir / point.tag
    if (out / COMPLETE).is_file():
        return
    tmp = point.load_dir / f".tmp-{point.tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
    cmd += ["--input_folder", str(point.folder), "--output_folder", str(tmp / point.tag)]
    # --inject_missing_state adds the universal_checkpoint_info our plain models do not carry.
    cmd += ["--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(
            f"converting checkpoint {point.tag} (world size {point.saved_world}) to a universal "
            f"checkpoint failed:\n{proc.stderr[-2000:]}\nResume with the original world size "
            f"({point.saved_world} ranks) instead"
        )
    atomic_write_bytes(tmp / point.tag / COMPLETE, b"{}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp / point.tag, out)
    shutil.rmtree(tmp, ignore_errors=True)


def prepare_resume(run_dir: str | Path, resume: str, world: int) -> ResumePoint | None:
    """Verify and find the resume point; on a world-size change convert it (rank 0).

    Rank 0 checks the tag's checksums first; under `resume="auto"` a corrupt tag is moved aside
    and the newest tag that verifies is taken instead (`train.checkpoint_files`).

    Call on all ranks before building the engine; build it with
    `deepspeed_config(..., load_universal=point.universal)`.
    """
    error: CheckpointError | None = None
    if is_main():
        try:
            _verify_on_main(checkpoints_dir(run_dir), resume)
        except (CheckpointError, OSError) as exc:
            error = exc if isinstance(exc, CheckpointError) else CheckpointError(one_line(exc))
    # The other ranks then read the `latest` that rank 0 verified (or repointed).
    if all_reduce_min(0 if error else 1) == 0:
        raise error or CheckpointError(
            f"rank 0 found no usable checkpoint in {checkpoints_dir(run_dir)} (see its message)"
        )
    point = find_resume(run_dir, resume, world)
    if point is None or not point.universal:
        return point
    error: CheckpointError | None = None
    if is_main():
        try:
            _convert_to_universal(point)
        except (CheckpointError, OSError) as exc:
            error = exc if isinstance(exc, CheckpointError) else CheckpointError(str(exc))
    if all_reduce_min(0 if error else 1) == 0:
        raise error or CheckpointError(f"rank 0 failed to convert checkpoint {point.tag}")
    return point


def load_checkpoint(engine: Any, point: ResumePoint) -> tuple[dict[str, Any], dict | None]:
    """Load engine, optimizer and RNG state from `point`; return (client_state, ema_state).

    RNG states are restored only at the same world size (ranks no longer correspond otherwise).

    Raises:
        CheckpointError: the tag cannot be read (corrupt, other model or format).
    """
    # Group hyperparameters from the config, restored after a universal load (see below).
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    try:
        path, client = engine.load_checkpoint(
            str(point.load_dir), tag=point.tag, load_lr_scheduler_states=False
        )
    except Exception as exc:  # DeepSpeed raises many types for unreadable shards
        raise CheckpointError(
            f"checkpoint {point.tag} in {point.folder} cannot be loaded ({type(exc).__name__}: "
            f"{exc}). It is corrupt or from another model; resume from an older tag with "
            "checkpoint.resume=<tag> or start afresh with checkpoint.resume=never"
        ) from exc
    if path is None or client is None:
        raise CheckpointError(f"checkpoint {point.tag} in {point.load_dir} has no model states")
    if point.universal:
        _repair_universal_load(engine, hyper)
    if client.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {point.tag} has format version {client.get('format_version')}, this "
            f"code reads {FORMAT_VERSION}; resume with the code version that wrote it"
        )
    rng_file = point.folder / f"rng_rank{rank()}.pt"
    if not point.universal and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    ema_file = point.folder / "ema.pt"
    ema = (
        torch.load(ema_file, map_location="cpu", weights_only=True) if ema_file.is_file() else None
    )
    return client, ema


def _repair_universal_load(engine: Any, hyper: list[dict]) -> None:
    # Two DeepSpeed 0.19.8 ZeRO-3 universal-load defects, harmless to undo at other stages:
    # (1) every group got group 0's hyperparameters; restore each group's own;
    # (2) one `step` tensor object is shared by all groups' states, and torch's AdamW increments
    #     it in place once per group, so bias correction would run ahead; give each its own copy.
    for group, saved in zip(engine.optimizer.param_groups, hyper, strict=True):
        group.update(saved)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

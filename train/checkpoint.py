"""Saving tagged DeepSpeed checkpoints: the tag folder, our `latest` pointer and pruning.

Layout (docs/design.md): `runs/<name>/checkpoints/step_0000012/` holds the engine shards
(written by all ranks), `client_state` (rank-identical data, persisted by DeepSpeed from rank 0),
`ema.pt` (rank 0), `rng_rank<r>.pt` (per rank) and a `COMPLETE` marker (rank 0, last, with
every file's size and checksum). The `latest` file names the newest complete tag; resume
(`train/resume.py`) reads only it, after rank 0 verified it (`train.checkpoint_files`).
DeepSpeed's own `latest` is never written (`save_latest=False`): it would appear before the
other ranks finish.

Fault injection: with `ATLASLDM_CRASH_BEFORE_COMMIT=<tag>` in the environment, rank 0 kills itself
with SIGKILL once every rank has written tag `<tag>` and before `COMPLETE`/`latest` (the worst
moment to die); the stage tests use it to show that resume then takes the previous checkpoint.
With `ATLASLDM_NO_SPACE_CHECK=1`, the free-space check before a save is skipped, so a full disk
is met inside DeepSpeed's own save (tests show every rank still stops in bounded time).
"""

from __future__ import annotations

import errno
import io
import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from atlasldm.train.checkpoint_files import (  # noqa: F401  (re-exported: the public checkpoint API)
    COMPLETE,
    LATEST,
    TAG_RE,
    CheckpointError,
    atomic_write_bytes,
    check_explicit_tag,
    complete_tags,
    read_complete,
    read_latest,
    select_auto_tag,
    tag_bytes,
    write_complete,
    write_latest,
)
from atlasldm.train.disk_space import free_bytes, human, is_disk_full, one_line, with_headroom
from atlasldm.train.distributed import all_reduce_min, is_main, rank, world_size

FORMAT_VERSION = 1
CRASH_ENV = "ATLASLDM_CRASH_BEFORE_COMMIT"  # fault injection for tests (module docstring)
# Fault injection for tests: skip the free-space check, so that a write fails inside DeepSpeed's
# own save, the case the check cannot rule out (another process fills the disk meanwhile).
NO_SPACE_CHECK_ENV = "ATLASLDM_NO_SPACE_CHECK"
BYTES_PER_PARAM = 24  # first save: fp32 master, two Adam moments, the model weights, the EMA
PER_RANK_BYTES = 64 << 10  # first save: each rank's RNG state and shard framing


def tag_for(step: int) -> str:
    """Return the tag of optimiser step `step`, e.g. `step_0000012`."""
    return f"step_{step:07d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    """Return `run_dir/checkpoints`."""
    return Path(run_dir) / "checkpoints"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _save_error(exc: BaseException, tag: str, ckpt_dir: Path, needed: int) -> str:
    free = free_bytes(ckpt_dir)
    if is_disk_full(exc, free, needed):
        what = f"the disk is full (this save needs about {human(needed)}, {human(free)} free)"
    elif isinstance(exc, dist.DistError):
        what = f"another rank stopped during the save ({one_line(exc, 160)})"
    else:
        what = one_line(exc)
    return (
        f"saving checkpoint {tag} in {ckpt_dir} failed: {what}. 'latest' still points at the "
        f"last good checkpoint ({read_latest(ckpt_dir)}); free disk space or lower "
        "checkpoint.keep_last_k, then rerun the command to resume"
    )


def _space_needed(engine: Any, ckpt_dir: Path) -> int:
    """Bytes the next tag takes: the last tag's size, or an estimate from the parameter count."""
    last = read_latest(ckpt_dir)
    if last is not None and (ckpt_dir / last).is_dir():
        return with_headroom(tag_bytes(ckpt_dir / last))
    module = getattr(engine, "module", None)
    params = module.parameters() if module is not None else []
    # ZeRO-3 keeps only a partition in p.numel(); ds_numel is the full size.
    count = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    return with_headroom(count * BYTES_PER_PARAM + world_size() * PER_RANK_BYTES)


def _check_space(engine: Any, ckpt_dir: Path, tag: str) -> int:
    """Agree on every rank, before DeepSpeed writes anything, that the tag fits; return its size.

    A rank that runs out of space inside DeepSpeed's save cannot tell the others (they wait in
    DeepSpeed's own barriers), so the common case, a disk already too full, is stopped here.
    """
    needed = -all_reduce_min(-_space_needed(engine, ckpt_dir))  # the largest estimate
    free = all_reduce_min(free_bytes(ckpt_dir))  # the fullest filesystem view
    if free < needed and os.environ.get(NO_SPACE_CHECK_ENV) != "1":
        full = OSError(errno.ENOSPC, "too little space")
        raise CheckpointError(_save_error(full, tag, ckpt_dir, needed))
    return needed


def _write_rank_files(folder: Path, ema_state: dict[str, torch.Tensor] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)  # on node-local views of a shared FS too
    _atomic_torch_save(_rng_state(), folder / f"rng_rank{rank()}.pt")
    if is_main() and ema_state is not None:
        _atomic_torch_save(ema_state, folder / "ema.pt")


def _commit(folder: Path, meta: dict[str, Any], keep_last_k: int) -> None:
    # COMPLETE (with every file's checksum) goes last into the folder, then `latest` moves.
    write_complete(folder, meta)
    write_latest(folder.parent, folder.name)
    prune(folder.parent, keep_last_k)


@dataclass
class Snapshot:
    """What a checkpoint holds besides the engine's own state."""

    step: int  # optimiser steps done; names the tag
    client_state: dict[str, Any]  # rank-identical (DeepSpeed keeps rank 0's): progress, data
    ema_state: dict[str, torch.Tensor] | None = None  # rank 0's EMA weights (None elsewhere)


def save_checkpoint(
    engine: Any, run_dir: str | Path, snapshot: Snapshot, keep_last_k: int = 3
) -> str:
    """Save a complete checkpoint of optimiser step `snapshot.step` on ALL ranks; return its tag.

    With `CRASH_ENV` naming the tag, rank 0 is killed after every file is written and before
    `COMPLETE`/`latest` (fault injection, see the module docstring).

    Raises:
        CheckpointError: too little space (every rank, before writing), or a rank failed to
            write (e.g. disk full); `latest` is left untouched.
    """
    ckpt_dir, step = checkpoints_dir(run_dir), snapshot.step
    folder = ckpt_dir / tag_for(step)
    if read_latest(ckpt_dir) == folder.name:
        return folder.name  # already saved and complete; rewriting in place risks the only copy
    state = dict(snapshot.client_state, step=step, format_version=FORMAT_VERSION)
    state.update(world_size=world_size(), zero_stage=engine.zero_optimization_stage())
    needed = _check_space(engine, ckpt_dir, folder.name)
    try:
        if is_main() and (folder / COMPLETE).exists():
            (folder / COMPLETE).unlink()  # re-saving a tag: it is incomplete until we finish
        engine.save_checkpoint(
            str(ckpt_dir), tag=folder.name, client_state=state, save_latest=False
        )
    except Exception as exc:
        # The other ranks may be inside DeepSpeed's barriers, which no agreement of ours can
        # meet: joining one would hang every rank until the process-group timeout. This rank
        # stops instead; its exit breaks their collectives and the launcher stops them.
        raise CheckpointError(_save_error(exc, folder.name, ckpt_dir, needed)) from exc
    _write_and_agree(folder, snapshot.ema_state, needed)
    if os.environ.get(CRASH_ENV) == folder.name and is_main():
        os.kill(os.getpid(), signal.SIGKILL)
    meta = {"step": step, "world_size": world_size(), "zero_stage": state["zero_stage"]}
    _commit_and_agree(folder, meta, keep_last_k, needed)
    return folder.name


def _write_and_agree(folder: Path, ema_state: dict | None, needed: int) -> None:
    """Write this rank's files of the tag; raise on every rank when any rank failed."""
    error: BaseException | None = None
    try:
        _write_rank_files(folder, ema_state)
    except (OSError, RuntimeError) as exc:  # torch.save reports ENOSPC as RuntimeError
        error = exc
    # Every rank learns whether any rank failed; a plain barrier would leave them guessing.
    if all_reduce_min(1 if error is None else 0) == 0:
        reason = error or RuntimeError("another rank failed to write its RNG state")
        raise CheckpointError(_save_error(reason, folder.name, folder.parent, needed)) from error


def _commit_and_agree(folder: Path, meta: dict[str, Any], keep_last_k: int, needed: int) -> None:
    """Commit the tag on rank 0; every rank waits for it and raises when it failed."""
    error: BaseException | None = None
    if is_main():
        try:
            _commit(folder, meta, keep_last_k)
        except OSError as exc:
            error = exc
    # Acts as the barrier: nobody moves on (or exits) before `latest` names this tag.
    if all_reduce_min(1 if error is None else 0) == 0:
        reason = error or OSError("rank 0 failed to commit")
        raise CheckpointError(_save_error(reason, folder.name, folder.parent, needed)) from error


def prune(ckpt_dir: str | Path, keep_last_k: int) -> list[str]:
    """Delete all but the newest `keep_last_k` complete tags (never `latest`); return deleted.

    Tags moved aside as corrupt (`<tag>.corrupt-<time>`) match no tag pattern and are kept.
    """
    ckpt_dir = Path(ckpt_dir)
    complete = complete_tags(ckpt_dir)
    if keep_last_k <= 0 or len(complete) <= keep_last_k:
        return []
    oldest_kept = complete[-keep_last_k][0]
    latest = read_latest(ckpt_dir)
    deleted = []
    for path in ckpt_dir.glob("step_*"):
        match = TAG_RE.match(path.name)
        # Incomplete tags older than the kept ones are debris from crashed saves.
        if match and int(match.group(1)) < oldest_kept and path.name != latest:
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(ckpt_dir / "universal" / path.name, ignore_errors=True)
            deleted.append(path.name)
    return sorted(deleted)

"""Tagged DeepSpeed checkpoints, our `latest` pointer, auto-resume and world-size changes.

Layout (docs/design.md): `runs/<name>/checkpoints/step_0000012/` holds the engine shards
(written by all ranks), `client_state` (rank-identical data, persisted by DeepSpeed from rank 0),
`ema.pt` (rank 0), `rng_rank<r>.pt` (per rank) and a `COMPLETE` marker (rank 0, last, with
every file's size and checksum). The `latest` file names the newest complete tag; resume reads
only it, after rank 0 verified it (`train.checkpoint_files`: corrupt tags are moved aside and
`resume=auto` falls back to the newest tag that verifies). DeepSpeed's own `latest` is
never written (`save_latest=False`): it would appear before the other ranks finish.

A world-size change is detected from the saved world size and handled with DeepSpeed universal
checkpointing: rank 0 converts the tag with `deepspeed.checkpoint.ds_to_universal` into
`checkpoints/universal/<tag>/` and the engine, built with `checkpoint.load_universal`, loads it.
Checked on DeepSpeed 0.19.8 (CPU, gloo): ZeRO-2 2 -> 1 -> 2 and ZeRO-3 2 -> 1 ranks match the
uninterrupted run to ~1e-7, after undoing two ZeRO-3 universal-load defects (see
`_repair_universal_load`). The conversion assumes the run folder is on a shared filesystem.

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
import subprocess
import sys
from collections.abc import Callable
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
from atlasldm.train.preempt import Preemption

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


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


def _commit(folder: Path, ckpt_dir: Path, meta: dict[str, Any], keep_last_k: int) -> None:
    # COMPLETE (with every file's checksum) goes last into the folder, then `latest` moves.
    write_complete(folder, meta)
    write_latest(ckpt_dir, folder.name)
    prune(ckpt_dir, keep_last_k)


def save_checkpoint(
    engine: Any,
    run_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None = None,
    keep_last_k: int = 3,
    before_commit: Callable[[str], None] | None = None,
) -> str:
    """Save a complete checkpoint of optimiser step `step` on ALL ranks; return its tag.

    `client_state` must be identical on every rank (DeepSpeed keeps rank 0's). `before_commit`
    runs on every rank after all files are written and before `COMPLETE`/`latest` (tests use it
    to kill a rank mid-save).

    Raises:
        CheckpointError: too little space (every rank, before writing), or a rank failed to
            write (e.g. disk full); `latest` is left untouched.
    """
    ckpt_dir, tag = checkpoints_dir(run_dir), tag_for(step)
    folder = ckpt_dir / tag
    if read_latest(ckpt_dir) == tag:
        return tag  # already saved and complete; rewriting in place would risk the only copy
    state = dict(client_state, step=step, format_version=FORMAT_VERSION, world_size=world_size())
    state["zero_stage"] = engine.zero_optimization_stage()
    needed = _check_space(engine, ckpt_dir, tag)
    try:
        if is_main() and (folder / COMPLETE).exists():
            (folder / COMPLETE).unlink()  # re-saving a tag: it is incomplete until we finish
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
    except Exception as exc:
        # The other ranks may be inside DeepSpeed's barriers, which no agreement of ours can
        # meet: joining one would hang every rank until the process-group timeout. This rank
        # stops instead; its exit breaks their collectives and the launcher stops them.
        raise CheckpointError(_save_error(exc, tag, ckpt_dir, needed)) from exc
    error: BaseException | None = None
    try:
        _write_rank_files(folder, ema_state)
    except (OSError, RuntimeError) as exc:  # torch.save reports ENOSPC as RuntimeError
        error = exc
    # Every rank learns whether any rank failed; a plain barrier would leave them guessing.
    if all_reduce_min(1 if error is None else 0) == 0:
        reason = error or RuntimeError("another rank failed to write its RNG state")
        raise CheckpointError(_save_error(reason, tag, ckpt_dir, needed)) from error
    if before_commit is not None:
        before_commit(tag)
    if os.environ.get(CRASH_ENV) == tag and is_main():
        os.kill(os.getpid(), signal.SIGKILL)
    if is_main():
        try:
            meta = {"step": step, "world_size": world_size(), "zero_stage": state["zero_stage"]}
            _commit(folder, ckpt_dir, meta, keep_last_k)
        except OSError as exc:
            error = exc
    # Acts as the barrier: nobody moves on (or exits) before `latest` names this tag.
    if all_reduce_min(1 if error is None else 0) == 0:
        reason = error or OSError("rank 0 failed to commit")
        raise CheckpointError(_save_error(reason, tag, ckpt_dir, needed)) from error
    return tag


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


def install_sigterm_handler() -> Callable[[], bool]:
    """Install a SIGTERM handler that only sets a flag; return a function reading the flag.

    The flag-only part of `train.preempt.Preemption` (the loop installs the whole of it, with the
    launcher watch and the save deadline); saving inside the handler could interrupt a
    collective.
    """
    return Preemption(timeout_s=float("inf")).install_handler().stop_requested

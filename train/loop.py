"""The one training loop, shared by every stage (docs/design.md, 'One loop for every stage').

Per optimiser step (`train/step.py`): fetch micro-batches -> forward/backward through the
DeepSpeed engine -> engine step; then EMA update -> log all-reduced means
(`train/step_metrics.py`) -> eval on cadence -> checkpoint on cadence -> stop at `run.max_steps`
or on SIGTERM (save, then return). Resume is automatic and happens first. The loop acts on one
`TrainingRun` and calls engine methods and the rank helpers of `train.distributed` only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from atlasldm.train.checkpoint import Snapshot
from atlasldm.train.checkpoint import save_checkpoint as save_tag
from atlasldm.train.compile import compile_engine, compile_plan
from atlasldm.train.config import TrainConfig, to_yaml
from atlasldm.train.disk_space import (
    OutputWriteError,
    describe_write_failure,
    one_line,
    with_headroom,
)
from atlasldm.train.distributed import (
    any_rank,
    build_engine,
    consolidated_state_dict,
    deepspeed_config,
    is_main,
    master_weights,
    print0,
    save_deepspeed_config,
    world_size,
)
from atlasldm.train.optim import EMA, build_optimizer
from atlasldm.train.preempt import Preemption, install_preemption
from atlasldm.train.resume import ResumePoint, load_checkpoint, prepare_resume
from atlasldm.train.stage import Stage
from atlasldm.train.step import autocast_for, one_step
from atlasldm.train.step_metrics import append_metrics, log_step
from atlasldm.train.throughput import peak_tflops
from atlasldm.train.tracking import RunInfo, make_tracker
from atlasldm.train.training_run import LoopState, TrainingRun


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite losses); the message says why."""


def batches_forever(stream: Any) -> Iterable[Any]:
    """Yield the stream's batches epoch after epoch (the stream advances its own epoch)."""
    while True:
        empty = True
        for batch in stream:
            empty = False
            yield batch
        if empty and len(stream) == 0:
            raise ValueError("the training stream yields no batches; lower batch.micro_cells")


def _due(step: int, every: int) -> bool:
    """True when a cadence of `every` steps (0 = never) falls on `step`."""
    return bool(every) and step % every == 0


def _count_step(training: TrainingRun, skipped: bool) -> None:
    """Advance the step; count a skipped one (stop after too many), else update the EMA."""
    state = training.state
    state.step += 1
    if skipped:
        state.bad_steps += 1
        print0(f"step {state.step}: non-finite loss, update skipped ({state.bad_steps})")
        limit = training.cfg.loop.max_bad_steps
        if state.bad_steps > limit:
            raise TrainingError(
                f"{state.bad_steps} steps had a NaN/inf loss (loop.max_bad_steps = "
                f"{limit}); lower optim.lr, use fp32, or check the data"
            )
    ema = training.ema
    if ema is not None and ema.due(state.step) and not skipped:  # nothing new to average
        ema.update(master_weights(training.engine), state.step)  # fp32 masters, not bf16 copies


def _save_on_cadence(training: TrainingRun, preemption: Preemption) -> bool:
    """Save when due, at the last step or on a stop request; return True when the run stops."""
    state, cfg = training.state, training.cfg
    stop = any_rank(preemption.stop_requested())
    done = state.step >= cfg.run.max_steps
    if stop:  # arms the save deadline on ranks that learnt of the stop from another rank
        preemption.request("a stop request on another rank")
    if stop or done or _due(state.step, cfg.checkpoint.every_steps):
        save(training)
    if stop:
        preemption.saved()
        preemption.close()
        where = training.run_dir
        print0(f"{preemption.reason}: saved step {state.step} in {where}; rerun to resume")
    return stop


def train_steps(training: TrainingRun) -> bool:
    """Train until max_steps or SIGTERM; return True when max_steps was reached."""
    cfg, state, stage = training.cfg, training.state, training.stage
    batches = iter(batches_forever(stage.train_stream))
    preemption = install_preemption(cfg.checkpoint.preempt_timeout_s)
    peak = peak_tflops(training.engine.device, cfg.precision.dtype, cfg.logging.peak_tflops)
    while state.step < cfg.run.max_steps:
        local, skipped = one_step(training, batches)
        _count_step(training, skipped)
        log_step(training, local, peak, skipped)
        if stage.eval_fn is not None and _due(state.step, cfg.run.eval_every):
            evaluate(training)
        if _save_on_cadence(training, preemption):
            return False
    preemption.close()
    return True


def evaluate(training: TrainingRun) -> dict[str, float]:
    """Run the stage's validation (collective) and record it; return the metrics."""
    engine, state, ema = training.engine, training.state, training.ema
    engine.module.eval()
    with torch.no_grad(), autocast_for(state.precision, engine.device):
        metrics = training.stage.eval_fn(engine.module, ema.state_dict() if ema else None)
    engine.module.train()
    state.eval_step, state.val = state.step, metrics
    print0(f"step {state.step} | " + " | ".join(f"{k} {v:.6g}" for k, v in metrics.items()))
    append_metrics(training.run_dir, {"step": state.step, **metrics})
    training.tracker.log_wandb(metrics, state.step)  # Tracker.log is train-step oriented
    return metrics


def save(training: TrainingRun) -> None:
    """Save a checkpoint of the current step on every rank (collective)."""
    state, stage, ema = training.state, training.stage, training.ema
    client = {
        **asdict(state),
        "data": stage.train_stream.state_dict(),
        "config": training.config_dict(),
        "stage": stage.name,
        **stage.client_extra,
    }
    ema_state = ema.state_dict() if (ema is not None and is_main()) else None
    snapshot = Snapshot(state.step, client, ema_state)
    save_tag(training.engine, training.run_dir, snapshot, training.cfg.checkpoint.keep_last_k)


def export(training: TrainingRun) -> None:
    """Write `run_dir/export` from the EMA (when kept) or the consolidated fp32 weights."""
    state, folder = training.state, training.run_dir / "export"
    weights = consolidated_state_dict(training.engine)  # collective at every ZeRO stage
    if training.ema is not None:
        weights = training.ema.state_dict()
    error = None
    if is_main():
        info = {"step": state.step, "cells_seen": state.cells_seen, "val": state.val}
        try:
            training.stage.export_fn(folder, weights, info)
        except Exception as exc:  # OSError, torch/safetensors write errors: all mean "stop"
            error = exc
    # In place of a barrier: a rank-0 failure must stop every rank, not leave them waiting.
    if any_rank(error is not None):
        needed = with_headroom(sum(w.numel() * w.element_size() for w in weights.values()))
        reason = error or OSError("rank 0 failed to write it")
        raise OutputWriteError(describe_write_failure("writing the export", folder, reason, needed))
    print0(f"export written to {folder}")
    if is_main():  # beside the export, not in it: a figure that cannot be drawn only warns
        from atlasldm.training_curves import CurveError, training_curves

        try:
            training_curves(training.run_dir, training.run_dir / "training_curves.png")
        except (CurveError, OSError) as exc:
            print(f"note: no training-curve figure ({exc})", file=sys.stderr, flush=True)


def open_run(stage: Stage, cfg: TrainConfig, run_dir: Path) -> tuple[TrainingRun, bool]:
    """Write the run folder's files, build the engine (and EMA), resume from the checkpoint to
    resume from (`checkpoint.resume`); return (the run, True when it resumed)."""
    world = world_size()
    compiling = compile_plan(cfg.precision.compile)  # first: "on" may refuse, leaving nothing
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        (run_dir / "stage").write_text(stage.name)
        print0(f"resolved config ({world} ranks):\n{to_yaml(cfg)}")
    point = prepare_resume(run_dir, cfg.checkpoint.resume, world)
    ds_config = deepspeed_config(cfg, world, load_universal=bool(point and point.universal))
    save_deepspeed_config(ds_config, run_dir)
    engine = build_engine(stage.model, build_optimizer(stage.model, cfg.optim), ds_config)
    if compiling:  # in place: parameter names and checkpoints stay as they are
        compile_engine(engine, stage, cfg.precision.compile)
    ema = EMA(master_weights(engine), cfg.ema) if stage.use_ema else None
    state = LoopState(precision=cfg.precision.dtype)
    training = TrainingRun(engine, stage, cfg, run_dir, state, ema)
    if point is not None:
        _resume(training, point)
    return training, point is not None


def _resume(training: TrainingRun, point: ResumePoint) -> None:
    """Load the engine, progress, data position and EMA of checkpoint `point`."""
    client, ema_state = load_checkpoint(training.engine, point)
    state = LoopState(**{k: client[k] for k in asdict(training.state) if k in client})
    state.precision = training.cfg.precision.dtype
    training.state = state
    training.stage.train_stream.load_state_dict(client["data"])
    if training.ema is not None and ema_state is not None:
        training.ema.load_state_dict(ema_state)
    print0(f"resumed from {point.tag} (step {state.step}, {state.cells_seen} cells)")


def _start_tracker(training: TrainingRun) -> None:
    cfg, state = training.cfg, training.state
    info = RunInfo(
        training.run_dir,
        cfg.run.name,
        config=training.config_dict(),
        run_id=state.wandb_run_id,
        total_steps=cfg.run.max_steps,
        start_step=state.step,
    )
    training.tracker = make_tracker(cfg.logging, info)
    state.wandb_run_id = training.tracker.run_id


def run(stage: Stage, cfg: TrainConfig, run_dir: str | Path, export_only: bool = False) -> dict:
    """Resume if possible, train `stage` to `run.max_steps`, export; return the last val metrics.

    With `export_only`, the latest checkpoint is loaded and exported without training.
    """
    training, resumed = open_run(stage, cfg, Path(run_dir))
    if export_only and not resumed:
        raise TrainingError(f"{run_dir} has no checkpoint to export; train it first")
    failure = None
    try:
        if not export_only:
            _start_tracker(training)
            if not train_steps(training):
                return {}
        if stage.eval_fn is not None and training.state.eval_step != training.state.step:
            evaluate(training)
        export(training)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        _close(training, failure)
    return training.state.val


def _close(training: TrainingRun, failure: BaseException | None) -> None:
    """Close the tracker and the stage. After a failure, an error here (W&B cannot write to the
    same full disk) is noted in one line: the first error is the one the user must see."""
    for close in (training.tracker.close, training.stage.close):
        try:
            close()
        except Exception as exc:
            if failure is None:
                raise
            print(f"note: while stopping, {one_line(exc)}", file=sys.stderr, flush=True)

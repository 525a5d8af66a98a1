"""The one training loop, shared by every stage (docs/design.md, 'One loop for every stage').

Per optimiser step: fetch micro-batches -> forward/backward through the DeepSpeed engine ->
engine step -> EMA update -> log all-reduced means -> eval on cadence -> checkpoint on cadence ->
stop at `run.max_steps` or on SIGTERM (save, then return). Resume is automatic and happens first.
Each rank's loss is weighted by its share of the micro-step's cells, and an empty micro-batch (an
epoch tail) runs on a stand-in cell with weight 0, so every rank joins every collective.
The loop calls engine methods and the rank helpers of `train.distributed` only.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from atlasldm.data.batch import CsrBatch
from atlasldm.train.checkpoint import load_checkpoint, prepare_resume
from atlasldm.train.checkpoint import save_checkpoint as save_tag
from atlasldm.train.config import TrainConfig, accumulation_steps, to_yaml
from atlasldm.train.disk_space import (
    OutputWriteError,
    append_line,
    describe_write_failure,
    one_line,
    with_headroom,
)
from atlasldm.train.distributed import (
    all_reduce_mean,
    any_rank,
    build_engine,
    consolidated_state_dict,
    deepspeed_config,
    global_sum,
    is_main,
    master_weights,
    print0,
    rank,
    save_deepspeed_config,
    update_skipped,
    world_size,
)
from atlasldm.train.optim import EMA, build_optimizer, lr_at, set_lr
from atlasldm.train.preempt import install_preemption
from atlasldm.train.throughput import peak_tflops, throughput_metrics
from atlasldm.train.tracking import make_tracker

if TYPE_CHECKING:  # train.stage imports this module
    from atlasldm.train.stage import Stage

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoopConfig:
    """Loop guards that are not part of the run-level sections of `TrainConfig`."""

    max_bad_steps: int = 10  # steps with a NaN/inf loss that are skipped before the run stops


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite losses); the message says why."""


@dataclass
class LoopState:
    """Rank-identical progress, saved in the checkpoint's client state."""

    step: int = 0  # optimiser steps done
    cells_seen: int = 0  # training cells consumed over all ranks
    bad_steps: int = 0  # skipped steps with a non-finite loss
    wandb_run_id: str | None = None  # reopened after a restart
    eval_step: int = -1  # step of the last validation (not repeated at the end)
    val: dict = field(default_factory=dict)  # metrics of the last validation
    precision: str = "fp32"  # engine dtype (validation runs under the same autocast)


def step_generator(seed: int, step: int, rank_: int, micro: int) -> torch.Generator:
    """Return a CPU generator seeded by (seed, step, rank, micro-batch): resume needs no state."""
    value = np.random.SeedSequence([seed, step, rank_, micro]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(value))


def batches_forever(stream: Any) -> Iterable[Any]:
    """Yield the stream's batches epoch after epoch (the stream advances its own epoch)."""
    while True:
        empty = True
        for batch in stream:
            empty = False
            yield batch
        if empty and len(stream) == 0:
            raise ValueError("the training stream yields no batches; lower batch.micro_cells")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux (bytes on macOS); the host process is what a CPU rank uses.
    scale = 1.0 if sys.platform != "darwin" else 1.0 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024


def _autocast(precision: str, device: torch.device) -> Any:
    # bf16/fp16 engines hold 16-bit weights while batches arrive in fp32: autocast runs the
    # matmuls in 16 bits, and the models keep their fp32 islands (NB likelihood, flow loss).
    dtype = _AUTOCAST.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def _zero_loss(module: torch.nn.Module) -> torch.Tensor:
    # A finite stand-in for a NaN loss: every trainable parameter gets a zero gradient, so the
    # DeepSpeed gradient hooks fire exactly as on a normal micro-batch and no rank hangs.
    params = [p for p in module.parameters() if p.requires_grad]
    return sum(p.float().sum() for p in params) * 0.0


def stand_in_batch(batch: CsrBatch) -> CsrBatch:
    """Return a one-cell batch with `batch`'s condition attributes, to run in place of an empty one.

    Under ZeRO-3 every rank must gather the same parameters in the same order, and DeepSpeed's
    gradient hooks must fire on every rank, so a rank without cells cannot skip the forward.
    The cell is gene token 1 counted once, library size 1, condition codes 0; soma_joinid -1
    names no cell (a latent-cache lookup then reads the last row, which the zero weight drops).
    """
    return CsrBatch.from_numpy(
        gene_ids=np.array([1]), counts=np.array([1.0]), indptr=np.array([0, 1]),
        library_size=np.array([1.0]), conditions=np.zeros((1, len(batch.condition_names))),
        condition_names=batch.condition_names, soma_joinid=np.array([-1]),
    )  # fmt: skip


def cell_weight(cells: int, total: float, world: int) -> float:
    """Return the factor on a rank's loss that makes the step's gradient a mean over its cells.

    Each rank's loss is a mean over its `cells` and DeepSpeed averages gradients over the
    `world` ranks, so unequal batches (an epoch tail) would weigh a cell of a small batch more.
    Scaling by cells * world / total (`total`: cells of all ranks in this micro-step) gives the
    gradient one rank would compute on their union. Exactly 1.0 when all ranks hold the same
    cells (runs without a ragged tail stay bit-identical); 0.0 for an empty rank, or everywhere
    when every rank is empty.
    """
    return cells * world / total if total > 0 else 0.0


def _micro_step(engine: Any, stage: Stage, cfg: TrainConfig, batch: Any, gen: torch.Generator):
    """Forward and backward of one micro-batch; return (loss, metrics, True when non-finite).

    The loss returned is the rank's unweighted mean over its cells (what is logged); an empty
    batch runs on `stand_in_batch` with weight 0 and never counts as non-finite.
    """
    cells = batch.num_cells
    weight = cell_weight(cells, global_sum(cells), world_size())  # collective on every rank
    with _autocast(cfg.precision.dtype, engine.device):
        loss, metrics = stage.loss_fn(engine.module, batch if cells else stand_in_batch(batch), gen)
    bad = not bool(torch.isfinite(loss.detach()).all())
    if bad:
        loss = _zero_loss(engine.module)
    engine.backward(loss if weight == 1.0 else loss * weight)
    return loss.detach(), metrics, bad and cells > 0


def _one_step(engine: Any, stage: Stage, cfg: TrainConfig, batches: Iterator, state: LoopState):
    """Run one optimiser step; return (local metrics, True when the step was skipped).

    Metrics are sums over this rank's cells (`_log` divides by the cells of all ranks), so
    empty micro-batches add nothing and ragged batches are weighted by their cells.
    """
    accum = accumulation_steps(cfg.batch, world_size())
    lr = lr_at(state.step, cfg.optim, cfg.run.max_steps)
    set_lr(engine.optimizer.param_groups, lr)
    t_start, wait, cells, tokens, bad, flops = time.perf_counter(), 0.0, 0, 0, False, 0.0
    sums: dict[str, float] = {}
    for k in range(accum):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        gen = step_generator(cfg.run.seed, state.step, rank(), k)
        loss, metrics, bad_micro = _micro_step(engine, stage, cfg, batch, gen)
        bad = bad or bad_micro
        if k == accum - 1:
            bad = any_rank(bad)  # every rank agrees before the update
        # Skip the update everywhere: weights and Adam state stay exactly as they were, while
        # DeepSpeed still clears the accumulated gradients and keeps its micro-step count.
        with update_skipped(engine) if bad and k == accum - 1 else nullcontext():
            engine.step()
        n = batch.num_cells
        for key, value in {"loss": loss, **metrics}.items():  # every rank keeps the same keys
            sums[key] = sums.get(key, 0.0) + (float(value) * n if n else 0.0)
        cells, tokens = cells + n, tokens + batch.num_tokens
        if n and stage.flops_fn is not None:
            flops += stage.flops_fn(batch)
    norm = engine.get_global_grad_norm()
    local = {f"train/{k}": v for k, v in sums.items()}
    local.update(
        {"lr": lr, "grad_norm": float(norm) if norm is not None else float("nan")},
        cells=float(cells),
        tokens=float(tokens),
        flops=flops,
        wait=wait,
        seconds=time.perf_counter() - t_start,
    )
    return local, bad


def _cell_means(mean: dict) -> None:
    """Turn the rank-averaged per-cell sums of `train/*` into means over the step's cells."""
    cells = mean["cells"]  # ratio of rank means = ratio of sums
    for key in [k for k in mean if k.startswith("train/")]:
        # NaN rather than 0.0 when no rank had a cell: there is no loss to report
        mean[key] = mean[key] / cells if cells > 0 else float("nan")


def _log(
    tracker: Any, state: LoopState, local: dict, run_dir: Path, device, peak, skipped: bool = False
) -> None:
    """All-reduce the step's metrics, derive throughput (and MFU), and write them (rank 0).

    A skipped step (non-finite loss, no update) has no loss to report: its `train/*` values are
    left out and the record says `"skipped": true`, so no plot shows a fake 0.0.
    """
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
            "perf/peak_mem_mb": _peak_memory_mb(device),
            "cells_seen": float(state.cells_seen),
        }
    )
    logged = {**mean, "train/skipped": 1.0} if skipped else mean
    tracker.log(logged, state.step, cells=int(round(cells)))
    _append_jsonl(run_dir, {"step": state.step, **({"skipped": True} if skipped else {}), **mean})


def _append_jsonl(run_dir: Path, record: dict) -> None:
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


def _evaluate(stage: Stage, engine: Any, ema: EMA | None, state: LoopState, run_dir: Path, tr):
    """Run the stage's validation (collective) and record it; return the metrics."""
    engine.module.eval()
    with torch.no_grad(), _autocast(state.precision, engine.device):
        metrics = stage.eval_fn(engine.module, ema.state_dict() if ema else None)
    engine.module.train()
    state.eval_step, state.val = state.step, metrics
    print0(f"step {state.step} | " + " | ".join(f"{k} {v:.6g}" for k, v in metrics.items()))
    _append_jsonl(run_dir, {"step": state.step, **metrics})
    if tr is not None:  # Tracker.log is train-step oriented
        tr.log_wandb(metrics, state.step)
    return metrics


def _save(engine: Any, stage: Stage, cfg: TrainConfig, ema: EMA | None, state: LoopState,
          run_dir: Path, config_dict: dict) -> None:  # fmt: skip
    client = {
        **asdict(state),
        "data": stage.train_stream.state_dict(),
        "config": config_dict,
        "stage": stage.name,
        **stage.client_extra,
    }
    ema_state = ema.state_dict() if (ema is not None and is_main()) else None
    save_tag(engine, run_dir, state.step, client, ema_state, cfg.checkpoint.keep_last_k)


def _train(engine, stage, cfg, loop_cfg, ema, state, run_dir, config_dict, tracker) -> bool:
    """Train until max_steps or SIGTERM; return True when max_steps was reached."""
    batches = iter(batches_forever(stage.train_stream))
    preemption = install_preemption(cfg.checkpoint.preempt_timeout_s)
    every_ckpt, every_eval = cfg.checkpoint.every_steps, cfg.run.eval_every
    peak = peak_tflops(engine.device, cfg.precision.dtype, cfg.logging.peak_tflops)
    while state.step < cfg.run.max_steps:
        local, skipped = _one_step(engine, stage, cfg, batches, state)
        state.step += 1
        if skipped:
            state.bad_steps += 1
            print0(f"step {state.step}: non-finite loss, update skipped ({state.bad_steps})")
            if state.bad_steps > loop_cfg.max_bad_steps:
                raise TrainingError(
                    f"{state.bad_steps} steps had a NaN/inf loss (loop.max_bad_steps = "
                    f"{loop_cfg.max_bad_steps}); lower optim.lr, use fp32, or check the data"
                )
        if ema is not None and ema.due(state.step) and not skipped:  # nothing new to average
            ema.update(master_weights(engine), state.step)  # fp32 masters, not bf16 copies
        _log(tracker, state, local, run_dir, engine.device, peak, skipped)
        if stage.eval_fn is not None and every_eval and state.step % every_eval == 0:
            _evaluate(stage, engine, ema, state, run_dir, tracker)
        stop = any_rank(preemption.stop_requested())
        done = state.step >= cfg.run.max_steps
        if stop:  # arms the save deadline on ranks that learnt of the stop from another rank
            preemption.request("a stop request on another rank")
        if stop or done or (every_ckpt and state.step % every_ckpt == 0):
            _save(engine, stage, cfg, ema, state, run_dir, config_dict)
        if stop:
            preemption.saved()
            preemption.close()
            print0(f"{preemption.reason}: saved step {state.step} in {run_dir}; rerun to resume")
            return False
    preemption.close()
    return True


def _export(engine, stage: Stage, ema: EMA | None, state: LoopState, run_dir: Path, val: dict):
    """Write `run_dir/export` from the EMA (when kept) or the consolidated fp32 weights."""
    weights = consolidated_state_dict(engine)  # collective at every ZeRO stage
    if ema is not None:
        weights = ema.state_dict()
    error = None
    if is_main():
        info = {"step": state.step, "cells_seen": state.cells_seen, "val": val}
        try:
            stage.export_fn(run_dir / "export", weights, info)
        except Exception as exc:  # OSError, torch/safetensors write errors: all mean "stop"
            error = exc
    # In place of a barrier: a rank-0 failure must stop every rank, not leave them waiting.
    if any_rank(error is not None):
        needed = with_headroom(sum(w.numel() * w.element_size() for w in weights.values()))
        reason = error or OSError("rank 0 failed to write it")
        raise OutputWriteError(
            describe_write_failure("writing the export", run_dir / "export", reason, needed)
        )
    print0(f"export written to {run_dir / 'export'}")


def run(stage: Stage, cfg: TrainConfig, run_dir: str | Path, export_only: bool = False) -> dict:
    """Resume if possible, train `stage` to `run.max_steps`, export; return the last val metrics.

    With `export_only`, the latest checkpoint is loaded and exported without training.
    """
    run_dir, world = Path(run_dir), world_size()
    loop_cfg: LoopConfig = getattr(cfg, "loop", LoopConfig())
    config_dict = json.loads(json.dumps(asdict(cfg), default=str))
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        (run_dir / "stage").write_text(stage.name)
        print0(f"resolved config ({world} ranks):\n{to_yaml(cfg)}")
    point = prepare_resume(run_dir, cfg.checkpoint.resume, world)
    ds_config = deepspeed_config(cfg, world, load_universal=bool(point and point.universal))
    save_deepspeed_config(ds_config, run_dir)
    engine = build_engine(stage.model, build_optimizer(stage.model, cfg.optim), ds_config)
    ema = None
    if stage.use_ema:
        ema = EMA(master_weights(engine), cfg.ema)
    state = LoopState(precision=cfg.precision.dtype)
    if point is not None:
        client, ema_state = load_checkpoint(engine, point)
        state = LoopState(**{k: client[k] for k in asdict(state) if k in client})
        state.precision = cfg.precision.dtype
        stage.train_stream.load_state_dict(client["data"])
        if ema is not None and ema_state is not None:
            ema.load_state_dict(ema_state)
        print0(f"resumed from {point.tag} (step {state.step}, {state.cells_seen} cells)")
    elif export_only:
        raise TrainingError(f"{run_dir} has no checkpoint to export; train it first")
    tracker, failure = None, None
    val: dict = {}
    try:
        if not export_only:
            tracker = make_tracker(
                cfg.logging, run_dir, cfg.run.name, config=config_dict,
                run_id=state.wandb_run_id, total_steps=cfg.run.max_steps, start_step=state.step,
            )  # fmt: skip
            state.wandb_run_id = tracker.run_id
            if not _train(engine, stage, cfg, loop_cfg, ema, state, run_dir, config_dict, tracker):
                return val
        if stage.eval_fn is not None and state.eval_step != state.step:
            _evaluate(stage, engine, ema, state, run_dir, tracker)
        val = state.val
        _export(engine, stage, ema, state, run_dir, val)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        _close(tracker, stage, failure)
    return val


def _close(tracker: Any, stage: Stage, failure: BaseException | None) -> None:
    """Close the tracker and the stage. After a failure, an error here (W&B cannot write to the
    same full disk) is noted in one line: the first error is the one the user must see."""
    for close in ([tracker.close] if tracker is not None else []) + [stage.close]:
        try:
            close()
        except Exception as exc:
            if failure is None:
                raise
            print(f"note: while stopping, {one_line(exc)}", file=sys.stderr, flush=True)

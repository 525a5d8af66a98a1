"""One optimiser step of the loop: micro-batches -> forward/backward -> engine step.

Each rank's loss is weighted by its share of the micro-step's cells, and an empty micro-batch (an
epoch tail) runs on a stand-in cell with weight 0, so every rank joins every collective. A
non-finite loss on any rank skips the update on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from atlasldm.train.batches import stand_in_batch
from atlasldm.train.config import accumulation_steps
from atlasldm.train.distributed import any_rank, global_sum, rank, update_skipped, world_size
from atlasldm.train.optim import lr_at, set_lr
from atlasldm.train.training_run import TrainingRun

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def step_generator(seed: int, step: int, rank_: int, micro: int) -> torch.Generator:
    """Return a CPU generator seeded by (seed, step, rank, micro-batch): resume needs no state."""
    value = np.random.SeedSequence([seed, step, rank_, micro]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(value))


def autocast_for(precision: str, device: torch.device) -> Any:
    """Return the autocast context of an engine of `precision` ("fp32": none)."""
    # bf16/fp16 engines hold 16-bit weights while batches arrive in fp32: autocast runs the
    # matmuls in 16 bits, and the models keep their fp32 islands (NB likelihood, flow loss).
    dtype = _AUTOCAST.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def _zero_loss(module: torch.nn.Module) -> torch.Tensor:
    # A finite stand-in for a NaN loss: every trainable parameter gets a zero gradient, so the
    # DeepSpeed gradient hooks fire exactly as on a normal micro-batch and no rank hangs.
    params = [p for p in module.parameters() if p.requires_grad]
    return sum(p.float().sum() for p in params) * 0.0


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


def micro_step(training: TrainingRun, batch: Any, gen: torch.Generator):
    """Forward and backward of one micro-batch; return (loss, metrics, True when non-finite).

    The loss returned is the rank's unweighted mean over its cells (what is logged); an empty
    batch runs on `stand_in_batch` with weight 0 and never counts as non-finite.
    """
    engine, cells = training.engine, batch.num_cells
    weight = cell_weight(cells, global_sum(cells), world_size())  # collective on every rank
    with autocast_for(training.cfg.precision.dtype, engine.device):
        inputs = batch if cells else stand_in_batch(batch)
        loss, metrics = training.stage.loss_fn(engine.module, inputs, gen)
    bad = not bool(torch.isfinite(loss.detach()).all())
    if bad:
        loss = _zero_loss(engine.module)
    engine.backward(loss if weight == 1.0 else loss * weight)
    return loss.detach(), metrics, bad and cells > 0


def one_step(training: TrainingRun, batches: Iterator) -> tuple[dict[str, float], bool]:
    """Run one optimiser step; return (local metrics, True when the step was skipped).

    Metrics are sums over this rank's cells (`step_metrics.log_step` divides by the cells of all
    ranks), so empty micro-batches add nothing and ragged batches are weighted by their cells.
    """
    engine, cfg, step = training.engine, training.cfg, training.state.step
    accum = accumulation_steps(cfg.batch, world_size())
    lr = lr_at(step, cfg.optim, cfg.run.max_steps)
    set_lr(engine.optimizer.param_groups, lr)
    t_start, wait, cells, tokens, bad, flops = time.perf_counter(), 0.0, 0, 0, False, 0.0
    sums: dict[str, float] = {}
    for k in range(accum):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        gen = step_generator(cfg.run.seed, step, rank(), k)
        loss, metrics, bad_micro = micro_step(training, batch, gen)
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
        if n and training.stage.flops_fn is not None:
            flops += training.stage.flops_fn(batch)
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

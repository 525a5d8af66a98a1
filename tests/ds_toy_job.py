"""Toy DeepSpeed job launched by tests/test_checkpoint_ds.py (not collected by pytest).

A tiny MLP regresses a deterministic function of the sample index. The data stream's whole state
is its integer position, so resume is exact. Rank 0 appends one JSON line per optimiser step to
`--loss-log` and writes the consolidated fp32 weights as an export at the end.

With `--loop`, the same model and data train through the project's one loop (`train.loop.run`)
instead, checkpointing every step; `--nan-at S` makes the last rank's first micro-batch of step S
return a NaN loss (the NaN guard test reads the checkpoints around it). `--sizes 3,1` gives rank r
micro-batches of the r-th size (consecutive samples, so `--sizes 4` on one rank is their union).

With `--threads-log DIR`, setup gets `--threads-per-rank` (run.threads_per_rank) and each rank
writes its torch thread counts after training to DIR/rank<R>.json (tests/test_threads.py).

Usage: torchrun --standalone --nproc_per_node 2 tests/ds_toy_job.py --run-dir D --stage 2 ...
       python tests/ds_toy_job.py ...   (a world of one)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from atlasldm.train.checkpoint import CRASH_ENV, Snapshot, save_checkpoint, tag_for
from atlasldm.train.cli import end_process
from atlasldm.train.config import (
    BatchConfig,
    CheckpointConfig,
    EMAConfig,
    LoggingConfig,
    OptimConfig,
    PrecisionConfig,
    RunConfig,
    TrainConfig,
    ZeroConfig,
    accumulation_steps,
)
from atlasldm.train.distributed import (
    all_reduce_mean,
    build_engine,
    consolidated_state_dict,
    deepspeed_config,
    init_distributed,
    is_main,
    local_world_size,
    master_weights,
    rank,
    save_deepspeed_config,
    usable_cores,
    world_size,
)
from atlasldm.train.export import write_export
from atlasldm.train.loop import run as loop_run
from atlasldm.train.optim import EMA, build_optimizer, lr_at, set_lr
from atlasldm.train.resume import load_checkpoint, prepare_resume
from atlasldm.train.stage import Stage


class ToyStream:
    """Deterministic samples: x = N(0, 1) seeded by the sample index, y = sum(sin(x))."""

    def __init__(self, state: dict) -> None:
        self.position = int(state["position"])

    def next_global(self, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs = []
        for idx in range(self.position, self.position + cells):
            gen = torch.Generator().manual_seed(1000 + idx)
            xs.append(torch.randn(4, generator=gen))
        self.position += cells
        x = torch.stack(xs)
        return x, torch.sin(x).sum(dim=1, keepdim=True)

    def state_dict(self) -> dict:
        return {"position": self.position}


def make_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        run=RunConfig(name=Path(args.run_dir).name, max_steps=args.total_steps),
        optim=OptimConfig(
            lr=1e-2, weight_decay=0.1, warmup_frac=0.25, decay_frac=0.25, grad_clip=1.0
        ),
        batch=BatchConfig(global_cells=8, micro_cells=args.micro_cells),
        precision=PrecisionConfig(dtype=args.dtype),
        zero=ZeroConfig(stage=args.stage, offload_optimizer=args.offload),
        ema=EMAConfig(enabled=True, decay=0.9, every=1, start_step=args.ema_start),
        checkpoint=CheckpointConfig(every_steps=2, keep_last_k=args.keep, resume="auto"),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--total-steps", type=int, default=8)
    parser.add_argument("--stop-at", type=int, default=8)
    parser.add_argument("--keep", type=int, default=4)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--offload", default="none")
    parser.add_argument("--loss-log", required=True)
    parser.add_argument("--loop", action="store_true")
    parser.add_argument("--nan-at", type=int, default=-1)
    parser.add_argument("--ema-start", type=int, default=2)  # EMA copies the weights before
    parser.add_argument("--no-ema", action="store_true")
    parser.add_argument("--export-only", action="store_true")
    parser.add_argument("--export-name", default="export")
    parser.add_argument("--micro-cells", type=int, default=2)
    parser.add_argument("--sizes", default="")  # cells per rank's micro-batch, e.g. "3,1"
    parser.add_argument("--threads-per-rank", type=int, default=0)
    parser.add_argument("--threads-log", default="")
    args, _ = parser.parse_known_args(argv)  # ignores the deepspeed launcher's --local_rank
    if args.threads_log:  # setup with the thread override; the plain call below is then a no-op
        init_distributed(args.threads_per_rank)
    init_distributed()
    if args.loop:
        loop_main(args)
        return
    if args.kill_at >= 0:  # rank 0 dies once every rank wrote this tag, before it is committed
        os.environ[CRASH_ENV] = tag_for(args.kill_at)
    cfg, world, run_dir = make_config(args), world_size(), Path(args.run_dir)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 1))
    point = prepare_resume(run_dir, cfg.checkpoint.resume, world)
    ds_cfg = deepspeed_config(cfg, world, load_universal=bool(point and point.universal))
    save_deepspeed_config(ds_cfg, run_dir)
    engine = build_engine(model, build_optimizer(model, cfg.optim), ds_cfg)
    ema = EMA(master_weights(engine), cfg.ema)
    step, data_state = 0, {"position": 0}
    if point is not None:
        client, ema_state = load_checkpoint(engine, point)
        step, data_state = client["step"], client["data"]
        ema.load_state_dict(ema_state)
    train(engine, ema, cfg, args, ToyStream(data_state), step)
    final = consolidated_state_dict(engine)
    if is_main():
        ema_json = json.dumps({k: v.tolist() for k, v in ema.state_dict().items()})
        write_export(run_dir / "export", final, {"kind": "toy"}, {"ema.json": ema_json})
    if args.threads_log:
        _write_threads(Path(args.threads_log))


def _write_threads(folder: Path) -> None:
    # After training, so the counts are the ones DeepSpeed and the steps left in place.
    record = {
        "rank": rank(),
        "threads": torch.get_num_threads(),
        "interop": torch.get_num_interop_threads(),
        "cores": usable_cores(),
        "local_ranks": local_world_size(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank()}.json").write_text(json.dumps(record))


def train(
    engine: Any, ema: EMA, cfg: TrainConfig, args: argparse.Namespace, data: ToyStream, step: int
) -> None:
    world, micro = world_size(), cfg.batch.micro_cells
    accum = accumulation_steps(cfg.batch, world)
    loss_fn = nn.MSELoss()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    while step < args.stop_at:
        set_lr(engine.optimizer.param_groups, lr_at(step, cfg.optim, cfg.run.max_steps))
        x, y = data.next_global(cfg.batch.global_cells)
        losses = []
        for k in range(accum):
            chunk = slice((k * world + rank()) * micro, (k * world + rank() + 1) * micro)
            pred = engine(x[chunk].to(dtype)).float()  # bf16/fp16 engines hold 16-bit weights
            loss = loss_fn(pred, y[chunk])
            engine.backward(loss)
            engine.step()  # applies the update only at the accumulation boundary
            losses.append(loss.item())
        step += 1
        if ema.due(step):
            ema.update(master_weights(engine), step)
        probe = torch.rand(()).item()  # global RNG: checks RNG restore on same-world resume
        mean = all_reduce_mean({"loss": sum(losses) / len(losses)})
        if is_main():
            with open(args.loss_log, "a") as fh:
                fh.write(json.dumps({"step": step, "loss": mean["loss"], "rng": probe}) + "\n")
        if step % cfg.checkpoint.every_steps == 0 or step == args.stop_at:
            state = {"data": data.state_dict(), "config": dataclasses.asdict(cfg)}
            snapshot = Snapshot(step, state, ema.state_dict() if is_main() else None)
            save_checkpoint(engine, Path(args.run_dir), snapshot, cfg.checkpoint.keep_last_k)


class ToyLoopStream:
    """This rank's toy micro-batches as the loop's training stream (state: micro-batches read)."""

    def __init__(self, micro: int, nan_position: int, sizes: list[int] | None = None) -> None:
        self.micro, self.nan_position, self.position = micro, nan_position, 0
        self.sizes = sizes or [micro] * world_size()  # cells of each rank's micro-batches

    def __iter__(self):
        while True:
            first = self.position * sum(self.sizes) + sum(self.sizes[: rank()])
            x, y = ToyStream({"position": first}).next_global(self.sizes[rank()])
            nan = self.position == self.nan_position
            self.position += 1
            yield SimpleNamespace(x=x, y=y, num_cells=len(x), num_tokens=x.numel(), nan=nan)

    def __len__(self) -> int:
        return 1

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def toy_loss(module: nn.Module, batch: SimpleNamespace, gen: torch.Generator):
    """MSE of the toy model; NaN on the micro-batch the stream marks."""
    loss = nn.functional.mse_loss(module(batch.x).float(), batch.y)
    return (loss * float("nan") if batch.nan else loss), {}


def loop_main(args: argparse.Namespace) -> None:
    """Train the toy model through `train.loop.run`, checkpointing every step."""
    cfg = dataclasses.replace(
        make_config(args),
        checkpoint=CheckpointConfig(every_steps=1, keep_last_k=0, resume="auto"),
        logging=LoggingConfig(every_steps=1, wandb_mode="disabled", progress_bar=False),
    )
    accum = accumulation_steps(cfg.batch, world_size())
    # The last rank's first micro-batch of step `nan_at` (1-based) has a NaN loss.
    nan_position = (args.nan_at - 1) * accum if rank() == world_size() - 1 else -1
    sizes = [int(n) for n in args.sizes.split(",")] if args.sizes else None
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 1))
    stage = Stage(
        name="toy",
        model=model,
        loss_fn=toy_loss,
        train_stream=ToyLoopStream(cfg.batch.micro_cells, nan_position, sizes),
        export_fn=lambda folder, weights, info: write_export(
            folder.parent / args.export_name, weights, {"kind": "toy"}
        ),
        use_ema=not args.no_ema,
    )
    loop_run(stage, cfg, args.run_dir, export_only=args.export_only)


if __name__ == "__main__":
    main()
    end_process(0)  # as the launchers do: no interpreter finalization after the work is done

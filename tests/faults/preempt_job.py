"""Toy DeepSpeed job of the preemption tests (tests/faults/test_preemption.py; not collected).

A tiny MLP trains through the project's one loop (`train.loop.run`) with no periodic checkpoint,
so a checkpoint appears only when the run is stopped (SIGTERM, a dead launcher) or reaches
`--total-steps`. Each step sleeps `--step-s` so that a test can signal it mid-run. W&B follows
WANDB_MODE (offline when unset, the project default). Each rank writes its pid to
`<run-dir>/pids/rank<R>` so that a test can signal one rank.

Usage: deepspeed --num_gpus 2 tests/faults/preempt_job.py --run-dir D [--total-steps N] ...
       torchrun --standalone --nproc_per_node 2 tests/faults/preempt_job.py --run-dir D ...
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from atlasldm.train.cli import end_process
from atlasldm.train.config import (
    BatchConfig,
    CheckpointConfig,
    LoggingConfig,
    OptimConfig,
    PrecisionConfig,
    RunConfig,
    TrainConfig,
)
from atlasldm.train.distributed import init_distributed, rank, shutdown_distributed, world_size
from atlasldm.train.export import write_export
from atlasldm.train.loop import run
from atlasldm.train.stage import Stage


class CountingStream:
    """Deterministic micro-batches x ~ N(0, 1), y = sum(sin(x)); state: micro-batches read."""

    def __init__(self, micro: int, step_s: float) -> None:
        self.micro, self.step_s, self.position = micro, step_s, 0

    def __iter__(self):
        while True:
            time.sleep(self.step_s)  # a step long enough to be signalled in the middle of a run
            gen = torch.Generator().manual_seed(self.position * world_size() + rank())
            x = torch.randn(self.micro, 4, generator=gen)
            self.position += 1
            yield SimpleNamespace(
                x=x, y=torch.sin(x).sum(1, keepdim=True), num_cells=self.micro, num_tokens=x.numel()
            )

    def __len__(self) -> int:
        return 1

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def _loss(module: nn.Module, batch: SimpleNamespace, gen: torch.Generator):
    return nn.functional.mse_loss(module(batch.x), batch.y), {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--total-steps", type=int, default=1_000_000)
    parser.add_argument("--preempt-timeout", type=float, default=25.0)
    parser.add_argument("--step-s", type=float, default=0.05)
    args, _ = parser.parse_known_args()  # ignores the deepspeed launcher's --local_rank
    init_distributed()
    run_dir = Path(args.run_dir)
    (run_dir / "pids").mkdir(parents=True, exist_ok=True)
    (run_dir / "pids" / f"rank{rank()}").write_text(str(os.getpid()))
    cfg = TrainConfig(
        run=RunConfig(name=run_dir.name, max_steps=args.total_steps),
        optim=OptimConfig(lr=1e-3),
        batch=BatchConfig(global_cells=2 * world_size(), micro_cells=2),
        precision=PrecisionConfig(dtype="fp32"),
        checkpoint=CheckpointConfig(
            every_steps=0, keep_last_k=2, preempt_timeout_s=args.preempt_timeout
        ),
        logging=LoggingConfig(every_steps=1, wandb_mode="offline", progress_bar=False),
    )
    torch.manual_seed(0)  # identical initial weights on every rank
    model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 1))
    stage = Stage(
        name="toy",
        model=model,
        loss_fn=_loss,
        train_stream=CountingStream(2, args.step_s),
        export_fn=lambda folder, weights, info: write_export(folder, weights, {"kind": "toy"}),
    )
    run(stage, cfg, run_dir)
    shutdown_distributed()  # as stage_main does after a normal end


if __name__ == "__main__":
    main()
    end_process(0)  # as the launchers do: no interpreter finalization after the work is done

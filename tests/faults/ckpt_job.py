"""Toy DeepSpeed job of the checkpoint and disk-full fault tests (not collected by pytest).

The toy model and data of tests/ds_toy_job.py train through the project's one loop
(`train.loop.run`), entered through `train.cli.run_stage` as the real launchers are, so a
checkpoint or disk problem ends in the one `error: ...` line a user sees. `--every` is the
checkpoint cadence (0: only at the end) and every checkpoint is kept. Metrics go to
`<run-dir>/metrics.jsonl`; the export (consolidated weights) to `<run-dir>/export`.

Usage (cwd = repository root): python -m tests.faults.ckpt_job --run-dir D [--total-steps N]
   2 ranks: the same command twice, with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from atlasldm.train.cli import run_stage
from atlasldm.train.config import CheckpointConfig, LoggingConfig
from atlasldm.train.distributed import init_distributed, shutdown_distributed
from atlasldm.train.export import write_export
from atlasldm.train.loop import run
from atlasldm.train.stage import Stage
from tests.ds_toy_job import ToyLoopStream, make_config, toy_loss


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--total-steps", type=int, default=4)
    parser.add_argument("--every", type=int, default=1)
    args = parser.parse_args(argv)
    toy = argparse.Namespace(
        run_dir=args.run_dir,
        total_steps=args.total_steps,
        micro_cells=2,
        dtype="fp32",
        stage=2,
        offload="none",
        ema_start=2,
        keep=0,
    )
    cfg = dataclasses.replace(
        make_config(toy),
        checkpoint=CheckpointConfig(every_steps=args.every, keep_last_k=0, resume="auto"),
        logging=LoggingConfig(every_steps=1, wandb_mode="disabled", progress_bar=False),
    )
    init_distributed()
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 1))
    stage = Stage(
        name="toy",
        model=model,
        loss_fn=toy_loss,
        train_stream=ToyLoopStream(cfg.batch.micro_cells, nan_position=-1),
        export_fn=lambda folder, weights, info: write_export(folder, weights, {"kind": "toy"}),
        use_ema=True,
    )
    run(stage, cfg, args.run_dir)
    shutdown_distributed()  # as stage_main does after a normal end


if __name__ == "__main__":
    run_stage(main)

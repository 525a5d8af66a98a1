"""From the command line to a finished run: load the stage's config, start this rank, build the
stage and hand it to the loop. Every stage's `main` calls `stage_main` with its config schema and
its `build_stage`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from atlasldm.data.source_check import check_source
from atlasldm.train.config import (
    TrainConfig,
    accumulation_steps,
    load_config,
    parse_stage_argv,
    to_yaml,
)
from atlasldm.train.distributed import init_distributed, shutdown_distributed, world_size
from atlasldm.train.loop import run
from atlasldm.train.stage import Stage

# (config, this rank's device) -> (the stage, the config with derived values filled in)
BuildStage = Callable[[Any, torch.device], tuple[Stage, Any]]


def run_dir_of(cfg: TrainConfig) -> Path:
    """Return the run folder `<run.root>/<run.name>` (config.yaml, checkpoints/, export/, ...)."""
    return Path(cfg.run.root) / cfg.run.name


def stage_main(
    schema: type[TrainConfig], build: BuildStage, argv: Sequence[str] | None, export_only: bool
) -> dict:
    """Load `schema` from argv, build the stage on this rank's device and run the loop.

    Returns the final validation metrics; with `export_only`, exports the latest checkpoint.
    `--help` and `--print-config` (rank 0 prints the config) end before any rank starts.
    """
    yamls, overrides, print_only = parse_stage_argv(schema, sys.argv[1:] if argv is None else argv)
    cfg = load_config(schema, yamls, overrides)
    if print_only:
        if os.environ.get("RANK", "0") == "0":
            print(to_yaml(cfg), end="", flush=True)
        return {}
    check_source(cfg.data.source, cfg.data.mode, cfg.data.vocab_path)  # before any rank reads it
    device = init_distributed(cfg.run.threads_per_rank)
    accumulation_steps(cfg.batch, world_size())  # fail before any data work
    stage, cfg = build(cfg, device)
    metrics = run(stage, cfg, run_dir_of(cfg), export_only=export_only)
    shutdown_distributed()
    return metrics

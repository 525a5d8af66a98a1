"""A run in progress: the one object the loop's steps, logs, evaluations and saves act on."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atlasldm.train.config import TrainConfig
from atlasldm.train.optim import EMA
from atlasldm.train.stage import Stage
from atlasldm.train.tracking import NullTracker, Tracker


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


@dataclass
class TrainingRun:
    """The engine training a stage under a config, with its progress and where it is recorded."""

    engine: Any  # the DeepSpeed engine (or anything with the engine methods the loop calls)
    stage: Stage
    cfg: TrainConfig
    run_dir: Path  # config.yaml, metrics.jsonl, checkpoints/, export/
    state: LoopState = field(default_factory=LoopState)
    ema: EMA | None = None  # kept when the stage asks for one
    tracker: Tracker | NullTracker = field(default_factory=NullTracker)  # rank 0: W&B, stdout

    def config_dict(self) -> dict[str, Any]:
        """Return the config as plain JSON values (W&B, the checkpoint's client state)."""
        return json.loads(json.dumps(asdict(self.cfg), default=str))

"""Shared entry-point wrapper of the training launchers (train_vae, train_dit, train_classifier)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from train.checkpoint import CheckpointError
from train.config import ConfigError
from train.export import ExportError


def run_stage(stage_main: Callable[[Sequence[str]], Any]) -> None:
    """Run a stage's `main(argv)`; configuration problems exit with a one-line message."""
    try:
        stage_main(sys.argv[1:])
    except (ConfigError, CheckpointError, ExportError) as exc:
        sys.exit(f"error: {exc}")

"""The Stage contract: what a stage hands to the one training loop (docs/design.md).

A stage (`train.vae_stage`, `train.dit_stage`, `train.classifier_stage`) assembles data, model,
loss, validation and export; the loop (`train/loop.py`) owns the engine, optimiser,
checkpoints, logging and the stop conditions, and knows nothing about VAEs or flows. Going from
the command line to a finished run is `train/runner.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atlasldm.data.batch import CsrBatch

# (module, batch on the host, per-micro-batch generator) -> (scalar loss, metrics by name).
LossFn = Callable[[nn.Module, CsrBatch, torch.Generator], tuple[torch.Tensor, dict[str, Any]]]
# (module, EMA weights or None) -> validation metrics, already averaged over ranks. Collective:
# every rank calls it at the same step.
EvalFn = Callable[[nn.Module, "dict[str, torch.Tensor] | None"], dict[str, float]]
# (export folder, fp32 weights by name, info {step, cells_seen, val metrics}) -> None; rank 0.
ExportFn = Callable[[Path, dict[str, torch.Tensor], dict[str, Any]], None]


@dataclass
class Stage:
    """Everything stage-specific the loop needs; built by a stage module's `build_stage`."""

    name: str  # "vae", "dit" or "classifier"; written to the run folder for launchers/export.py
    model: nn.Module  # the trainable network handed to DeepSpeed (frozen parts stay outside)
    loss_fn: LossFn  # training loss of one micro-batch
    train_stream: Any  # CellStream of the training split (state_dict/load_state_dict, iterable)
    export_fn: ExportFn  # writes the export folder from consolidated (or EMA) fp32 weights
    eval_fn: EvalFn | None = None  # validation on the held-out cells; None = no validation
    use_ema: bool = False  # keep an EMA of the weights (evaluated and exported when True)
    client_extra: dict[str, Any] = field(default_factory=dict)  # vocabularies etc. (checkpoint)
    closers: list[Callable[[], None]] = field(default_factory=list)  # called when the run ends
    flops_fn: Callable[[Any], float] | None = None  # micro-batch -> model training FLOPs (MFU)

    def close(self) -> None:
        """Release stream threads and other resources."""
        for close in self.closers:
            close()

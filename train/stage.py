"""The Stage handed to the one training loop (docs/design.md), and shared stage plumbing.

The plumbing is what the VAE, DiT and classifier stage modules have in common: their `main`, the
run folder, the built-in data copy, the train/validation streams and the export's provenance.
A stage assembles data, model, loss and export; the loop (`train/loop.py`) owns the engine,
optimiser, checkpoints, logging and the stop conditions, and knows nothing about VAEs or flows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atlasldm.data.batch import CsrBatch
from atlasldm.data.config import DataConfig
from atlasldm.data.ingest import main as ingest_main
from atlasldm.data.source_check import check_source
from atlasldm.data.stream import CellStream
from atlasldm.train.config import TrainConfig, accumulation_steps, load_config, split_cli
from atlasldm.train.distributed import (
    barrier,
    init_distributed,
    is_main,
    rank,
    shutdown_distributed,
    world_size,
)
from atlasldm.train.loop import run

BUILTIN = "builtin:pbmc68k"

# (module, batch on the host, per-micro-batch generator) -> (scalar loss, metrics by name).
LossFn = Callable[[nn.Module, CsrBatch, torch.Generator], tuple[torch.Tensor, dict[str, Any]]]
# (module, EMA weights or None) -> validation metrics, already averaged over ranks. Collective:
# every rank calls it at the same step.
EvalFn = Callable[[nn.Module, "dict[str, torch.Tensor] | None"], dict[str, float]]
# (export folder, fp32 weights by name, info {step, cells_seen, val metrics}) -> None; rank 0.
ExportFn = Callable[[Path, dict[str, torch.Tensor], dict[str, Any]], None]


@dataclass
class Stage:
    """Everything stage-specific the loop needs; built by `train.vae_stage` / `train.dit_stage`."""

    name: str  # "vae" or "dit"; written to the run folder so `launchers/export.py` can dispatch
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


def run_dir_of(cfg: TrainConfig) -> Path:
    """Return `<run.root>/<run.name>`."""
    return Path(cfg.run.root) / cfg.run.name


def resolve_source(data: DataConfig, root: str) -> str:
    """Return the data source, ingesting the built-in copy on rank 0 first when none is given."""
    if data.source:
        return data.source
    copy = Path(root) / "data" / "pbmc68k"
    if is_main() and not (copy / "manifest.json").is_file():
        print(f"ingesting {BUILTIN} into {copy} (first use)", flush=True)
        if ingest_main(["--source", BUILTIN, "--out", str(copy), "--log-level", "WARNING"]) != 0:
            raise RuntimeError(f"ingesting {BUILTIN} into {copy} failed")
    barrier()  # the other ranks wait until the copy exists
    return str(copy)


def open_streams(data: DataConfig) -> tuple[CellStream, CellStream | None, list[Callable]]:
    """Return this rank's (training stream, validation stream or None, their close functions).

    The validation stream keeps its last partial batch; there is none when `val_fraction` is 0.
    """
    train = CellStream(data, "train", rank(), world_size())
    if data.val_fraction <= 0:
        return train, None, [train.close]
    val = CellStream(replace(data, drop_last=False), "val", rank(), world_size())
    return train, val, [train.close, val.close]


def code_version() -> str:
    """Return the git commit of the code (with '+dirty'), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def provenance_json(stage: str, info: dict[str, Any], **fields: Any) -> str:
    """Return the text of an export's provenance.json.

    Holds the stage name, the loop's export `info` (step, cells seen, validation metrics), the
    stage's own `fields` (data source, fingerprints, ...), the code version and the UTC time.
    """
    record = {
        "stage": stage, **info, **fields, "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    return json.dumps(record, indent=2, default=str)


def stage_main(
    schema: type[TrainConfig],
    build: Callable[[Any, torch.device], tuple[Stage, Any]],
    argv: Sequence[str] | None,
    export_only: bool,
) -> dict:
    """Load `schema` from argv, build the stage on this rank's device and run the loop.

    Returns the final validation metrics; with `export_only`, exports the latest checkpoint.
    """
    yamls, overrides = split_cli(sys.argv[1:] if argv is None else argv)
    cfg = load_config(schema, yamls, overrides)
    check_source(cfg.data.source, cfg.data.mode, cfg.data.vocab_path)  # before any rank reads it
    device = init_distributed(cfg.run.threads_per_rank)
    accumulation_steps(cfg.batch, world_size())  # fail before any data work
    stage, cfg = build(cfg, device)
    metrics = run(stage, cfg, run_dir_of(cfg), export_only=export_only)
    shutdown_distributed()
    return metrics

"""Stage 1: assembles the data, the VAE, its loss, validation and export for the one loop.

`deepspeed launchers/train_vae.py [configs/*.yaml ...] [key=value ...]` runs with no arguments:
it ingests `builtin:pbmc68k` into `<run.root>/data/pbmc68k` on first use and trains the
reference-default VAE (`VAEConfig` defaults) on it. The vocabulary size V is derived from the
copy's genes.tsv, never configured.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from atlasldm.data.batch import CsrBatch
from atlasldm.data.config import DataConfig
from atlasldm.data.stream import CellStream
from atlasldm.data.vocab import GeneVocab
from atlasldm.models.vae import VAE, VAEConfig
from atlasldm.train.batches import cell_batch
from atlasldm.train.config import (
    BatchConfig,
    CheckpointConfig,
    ConfigError,
    LoggingConfig,
    PrecisionConfig,
    RunConfig,
    TrainConfig,
)
from atlasldm.train.distributed import all_reduce_mean, rank
from atlasldm.train.export import provenance_json, write_export
from atlasldm.train.runner import stage_main
from atlasldm.train.stage import Stage
from atlasldm.train.step import step_generator
from atlasldm.train.streams import open_streams, resolve_source
from atlasldm.train.throughput import vae_flops_fn

_DERIVED_V = 1  # placeholder for model.num_genes until the copy's genes.tsv is read
_VAL_KEYS = ("nll", "mse", "pearson", "zero_agreement")


@dataclass
class VAEStageConfig(TrainConfig):
    """Stage-1 schema: run-level sections + data + model (defaults: a CPU-sized default run)."""

    run: RunConfig = field(
        default_factory=lambda: RunConfig(name="vae", max_steps=150, eval_every=50)
    )  # identity, seed, length; CPU-sized
    batch: BatchConfig = field(
        default_factory=lambda: BatchConfig(global_cells=128, micro_cells=32)
    )  # divides by 1, 2 and 4 ranks
    precision: PrecisionConfig = field(
        default_factory=lambda: PrecisionConfig(dtype="fp32")
    )  # CPU default; the GPU recipes set bf16
    checkpoint: CheckpointConfig = field(
        default_factory=lambda: CheckpointConfig(every_steps=50)
    )  # saves, resume
    logging: LoggingConfig = field(
        default_factory=lambda: LoggingConfig(every_steps=10)
    )  # metric lines, W&B
    data: DataConfig = field(
        default_factory=lambda: DataConfig(val_fraction=0.1, drop_last=True)
    )  # stream; source "" = the built-in pbmc68k copy; micro_batch = batch.micro_cells
    model: VAEConfig = field(
        default_factory=lambda: VAEConfig(num_genes=_DERIVED_V)
    )  # VAE hyperparameters; num_genes comes from the data


def num_genes_of(data: DataConfig) -> int:
    """Return V, the rows of the vocabulary (copy's genes.tsv, or vocab_path in direct mode)."""
    path = Path(data.vocab_path) if data.vocab_path else Path(data.source) / "genes.tsv"
    return len(GeneVocab.read(path))  # a genes.tsv or a plain gene-id list


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def vae_loss(module: nn.Module, batch: CsrBatch, gen: torch.Generator):
    """Loss of one micro-batch: NB NLL summed over genes, mean over cells (+ beta KL)."""
    # forward = loss, so ZeRO-3 hooks fire; `gen` draws sampled genes (seeded by step and rank)
    out = module(cell_batch(batch, _device(module)), None, gen)
    return out.total, {k: float(v) for k, v in out.metrics.items()}


def make_vae_eval(val: CellStream, seed: int):
    """Return the validation function: reconstruction metrics on the validation cells."""

    def evaluate(module: nn.Module, ema_state: dict | None) -> dict[str, float]:
        sums = {f"{k}_{s}": 0.0 for k in _VAL_KEYS for s in ("sum", "n")}
        for i, batch in enumerate(val.iter_eval()):
            if batch.num_cells < 2:  # Pearson across cells needs two of them
                continue
            gen = step_generator(seed, 0, rank(), i)
            metrics = module.reconstruction_metrics(cell_batch(batch, _device(module)), None, gen)
            for key in _VAL_KEYS:
                if np.isfinite(metrics[key]):  # weighted by cells, NaN batches skipped
                    sums[f"{key}_sum"] += metrics[key] * batch.num_cells
                    sums[f"{key}_n"] += batch.num_cells
        mean = all_reduce_mean(sums)  # a ratio of means is the ratio of sums
        return {f"val/{k}": mean[f"{k}_sum"] / max(mean[f"{k}_n"], 1e-12) for k in _VAL_KEYS}

    return evaluate


def libsize_stats(source: str, joinids: np.ndarray, labels: dict[str, list[str]]) -> dict:
    """Return per-condition mean/std of log library size over the training cells (copy mode)."""
    side = Path(source) / "side"
    log_lib = np.log(np.maximum(np.load(side / "library_size.npy")[joinids], 1.0))
    out: dict[str, Any] = {
        "all": {"mean": float(log_lib.mean()), "std": float(log_lib.std()), "n": len(log_lib)}
    }
    for column, values in labels.items():
        path = side / f"codes_{column}.npy"
        if not path.is_file():
            continue
        codes = np.load(path)[joinids]
        per = {}
        for code, value in enumerate(values):
            sel = log_lib[codes == code]
            if len(sel):
                per[value] = {"mean": float(sel.mean()), "std": float(sel.std()), "n": len(sel)}
        out[column] = per
    return {"log_library_size": out, "split": "train"}


def make_vae_export(cfg: VAEStageConfig, stream: CellStream):
    """Return the export function: weights, config.json, genes.tsv, labels.json, libsize.json."""
    source = Path(cfg.data.source)
    labels_text = (source / "labels.json").read_text() if cfg.data.mode == "copy" else "{}"
    libsize: dict[str, Any] = {"log_library_size": None, "note": "direct mode: not computed"}
    if cfg.data.mode == "copy":  # side/ arrays exist only in training copies
        libsize = libsize_stats(str(source), stream.source.joinids, json.loads(labels_text))
    genes = Path(cfg.data.vocab_path) if cfg.data.vocab_path else source / "genes.tsv"

    def export(folder: Path, weights: dict[str, torch.Tensor], info: dict) -> None:
        data = {"data_source": str(source), "data_fingerprint": stream.fingerprint}
        data |= {"data_mode": cfg.data.mode, "data_obs_filter": cfg.data.obs_filter}
        provenance = provenance_json("vae", info, **data)
        extra = {
            "genes.tsv": GeneVocab.read(genes).tsv_text(),  # a plain list becomes a genes.tsv
            "labels.json": labels_text,
            "libsize.json": json.dumps(libsize, indent=2),
            "provenance.json": provenance,
        }
        write_export(folder, weights, asdict(cfg.model), extra)

    return export


def build_stage(
    cfg: VAEStageConfig, device: torch.device | None = None
) -> tuple[Stage, VAEStageConfig]:
    """Return the VAE stage and the config with derived values filled in (source, V, micro).

    `device` is unused: DeepSpeed moves the VAE, and batches follow its parameters.
    """
    source = resolve_source(cfg.data, cfg.run.root)
    data = replace(cfg.data, source=source, micro_batch=cfg.batch.micro_cells)
    num_genes = num_genes_of(data)
    if cfg.model.num_genes not in (_DERIVED_V, num_genes):
        raise ConfigError(
            f"model.num_genes = {cfg.model.num_genes} but the data has {num_genes} genes; "
            "num_genes is derived from the data's genes.tsv, remove the override"
        )
    cfg = replace(cfg, data=data, model=replace(cfg.model, num_genes=num_genes))
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = VAE(cfg.model)
    train, val, closers = open_streams(data)
    evaluate = make_vae_eval(val, cfg.run.seed) if val is not None else None
    labels = (Path(source) / "labels.json").read_text() if data.mode == "copy" else "{}"
    extra = {"genes_tsv": Path(source, "genes.tsv").read_text() if data.mode == "copy" else ""}
    extra["labels"] = json.loads(labels)
    stage = Stage(
        name="vae",
        model=model,
        loss_fn=vae_loss,
        train_stream=train,
        export_fn=make_vae_export(cfg, train),
        eval_fn=evaluate,
        client_extra=extra,
        closers=closers,
        flops_fn=vae_flops_fn(cfg.model),
    )
    return stage, cfg


def main(argv: Sequence[str] | None = None, export_only: bool = False) -> dict:
    """Train (or, with `export_only`, export) the VAE; return the final validation metrics."""
    return stage_main(VAEStageConfig, build_stage, argv, export_only)

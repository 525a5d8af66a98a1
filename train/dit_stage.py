"""Stage 2: frozen VAE encoder + DiT (or skip-MLP) denoiser trained with flow matching.

Loads the VAE **export** (not a checkpoint), freezes it and encodes each micro-batch on the fly
(posterior mean). Latents are standardised with a scalar mean/std estimated once from training
cells (saved as `latent_stats.json` in the export). Conditions come from `data.condition_columns`;
condition dropout follows the denoiser config; an EMA of the weights is evaluated and exported.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from atlasldm.data.batch import CsrBatch
from atlasldm.data.config import DataConfig
from atlasldm.data.stream import CellStream
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.flow import flow_loss
from atlasldm.models.pretrained import export_digest
from atlasldm.models.skip_mlp import SkipMLP, SkipMLPConfig
from atlasldm.models.vae import VAE, VAEConfig
from atlasldm.train.config import (
    BatchConfig,
    CheckpointConfig,
    ConfigError,
    EMAConfig,
    LoggingConfig,
    OptimConfig,
    PrecisionConfig,
    RunConfig,
    TrainConfig,
)
from atlasldm.train.distributed import all_reduce_mean, rank, world_size
from atlasldm.train.export import ExportError, read_export, write_export
from atlasldm.train.latents import build_cache, cache_stats, lookup
from atlasldm.train.loop import LoopConfig, step_generator
from atlasldm.train.stage import (
    Stage,
    open_streams,
    provenance_json,
    resolve_source,
    run_dir_of,
    stage_main,
)
from atlasldm.train.throughput import denoiser_flops_fn
from atlasldm.train.vae_stage import cell_batch

Encode = Callable[[CsrBatch, torch.device], torch.Tensor]  # batch -> latents (B, M, D) fp32


@dataclass
class FrozenVAEConfig:
    """Which VAE export feeds a latent stage (denoiser or classifier), and how latents are made."""

    vae_run: str = "vae"  # VAE run folder under run.root whose export/ is loaded
    vae_export: str = ""  # explicit VAE export folder ("" = <run.root>/<vae_run>/export)
    latent_stats_cells: int = 256  # training cells used to estimate the latent mean/std
    latents: Literal["encode", "cache"] = "encode"  # encode each batch, or a cache written once


@dataclass
class DenoiserStageConfig(FrozenVAEConfig):
    """What stage 2 trains and on which VAE."""

    denoiser: Literal["dit", "skip_mlp"] = "dit"  # adaLN-Zero DiT or scDiffusion-style MLP


@dataclass
class DiTStageConfig(TrainConfig):
    """Stage-2 schema: run-level sections + data + denoiser configs (CPU-sized defaults)."""

    run: RunConfig = field(
        default_factory=lambda: RunConfig(name="dit", max_steps=200, eval_every=100)
    )  # identity, seed, length; minutes on 2 CPU cores
    batch: BatchConfig = field(
        default_factory=lambda: BatchConfig(global_cells=128, micro_cells=32)
    )  # divides by 1, 2 and 4 ranks
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=5e-4, schedule="cosine")
    )  # docs/model.md, 'Training recipes': AdamW 5e-4, warmup 10%, cosine to 0.1 lr
    precision: PrecisionConfig = field(
        default_factory=lambda: PrecisionConfig(dtype="fp32")
    )  # CPU default; the GPU recipes set bf16
    ema: EMAConfig = field(
        default_factory=lambda: EMAConfig(enabled=True, decay=0.99, every=1, start_step=50)
    )  # EMA weights are evaluated and exported; decay 0.99 suits runs of a few hundred steps
    checkpoint: CheckpointConfig = field(
        default_factory=lambda: CheckpointConfig(every_steps=100)
    )  # saves, resume
    logging: LoggingConfig = field(
        default_factory=lambda: LoggingConfig(every_steps=20)
    )  # metric lines, W&B
    data: DataConfig = field(
        default_factory=lambda: DataConfig(
            val_fraction=0.1, drop_last=True, condition_columns=["cell_type"]
        )
    )  # stream; source "" = the VAE's data source
    stage: DenoiserStageConfig = field(default_factory=DenoiserStageConfig)  # denoiser, VAE
    model: DiTConfig = field(default_factory=DiTConfig)  # DiT; M, D, vocab sizes derived
    skip_mlp: SkipMLPConfig = field(default_factory=SkipMLPConfig)  # used when denoiser=skip_mlp
    loop: LoopConfig = field(default_factory=LoopConfig)  # NaN guard


def vae_export_dir(cfg: DiTStageConfig) -> Path:
    """Return the VAE export folder the stage loads."""
    if cfg.stage.vae_export:
        return Path(cfg.stage.vae_export)
    return Path(cfg.run.root) / cfg.stage.vae_run / "export"


def load_frozen_vae(folder: Path, device: torch.device) -> tuple[VAE, dict]:
    """Return (frozen VAE in eval mode on `device`, provenance dict) from a VAE export.

    Raises:
        ExportError: the export is missing or unreadable.
    """
    if not (folder / "export.json").is_file():
        raise ExportError(
            f"VAE export {folder} not found (no export.json): run train_vae.py first, or point "
            "stage.vae_export / stage.vae_run at an existing VAE run"
        )
    state, config, _ = read_export(folder)
    vae = VAE(VAEConfig(**config))
    vae.load_state_dict(state)
    vae.requires_grad_(False)
    provenance = json.loads((folder / "provenance.json").read_text())
    return vae.eval().to(device), provenance


def frozen_vae_provenance(vae_dir: Path, data: DataConfig) -> dict[str, str]:
    """Return the provenance fields of a latent stage: the VAE export, its digest, the data."""
    return {
        "vae_export": str(vae_dir),
        "vae_export_digest": export_digest(vae_dir),
        "data_source": data.source,
    }


def latent_stats(vae: VAE, data: DataConfig, cells: int, device: torch.device) -> dict:
    """Return the scalar mean/std of standardisation, from the first training cells of each rank."""
    stream = CellStream(data, "train", rank(), world_size())
    total = {"sum": 0.0, "sq": 0.0, "n": 0.0}
    with torch.no_grad():
        for batch in stream.iter_eval():
            z = vae.encode(cell_batch(batch, device)).double()
            total["sum"] += float(z.sum())
            total["sq"] += float(z.square().sum())
            total["n"] += z.numel()
            if total["n"] >= cells * z[0].numel() / world_size():
                break
    stream.close()
    mean = all_reduce_mean(total)
    mu = mean["sum"] / mean["n"]
    std = max(mean["sq"] / mean["n"] - mu * mu, 1e-12) ** 0.5
    return {"mean": mu, "std": std, "cells": cells}


def make_flow_loss(encode: Encode, stats: dict):
    """Return the training loss: flow matching on standardised latents with condition dropout."""

    def loss_fn(module: nn.Module, batch: CsrBatch, gen: torch.Generator):
        device = next(module.parameters()).device
        with torch.no_grad():
            z = (encode(batch, device) - stats["mean"]) / stats["std"]
        labels = module.drop_labels(batch.conditions, gen).to(device)  # CPU draws (resume)
        return flow_loss(module, z, labels, t_generator=gen), {}

    return loss_fn


def make_flow_eval(encode: Encode, stats: dict, val: CellStream, ema_model: nn.Module, seed: int):
    """Return the validation: flow loss of the raw and EMA weights with fixed t and noise."""

    def evaluate(module: nn.Module, ema_state: dict | None) -> dict[str, float]:
        if ema_state is not None:
            ema_model.load_state_dict(ema_state, strict=False)
        nets = {"val/flow_loss": module}
        if ema_state is not None:
            nets["val/flow_loss_ema"] = ema_model
        sums = {k: 0.0 for k in nets} | {"n": 0.0}
        device = next(module.parameters()).device
        for i, batch in enumerate(val.iter_eval()):
            if batch.num_cells == 0:
                continue
            z = (encode(batch, device) - stats["mean"]) / stats["std"]
            labels = batch.conditions.to(device)
            for key, net in nets.items():  # same t and noise for both weight sets
                gen = step_generator(seed, 0, rank(), i)
                sums[key] += float(flow_loss(net, z, labels, t_generator=gen)) * batch.num_cells
            sums["n"] += batch.num_cells
        mean = all_reduce_mean(sums)
        return {k: v / max(mean["n"], 1e-12) for k, v in mean.items() if k != "n"}

    return evaluate


def make_dit_export(cfg: DiTStageConfig, model_cfg, labels: dict, stats: dict, vae_dir: Path):
    """Return the export function: EMA weights, config.json, conditions.json, latent stats."""
    columns = list(cfg.data.condition_columns)
    conditions = {
        "columns": columns,
        "vocabularies": {c: labels[c] for c in columns},
        "null_indices": {c: len(labels[c]) for c in columns},
        "dropout": {"scheme": model_cfg.cfg_dropout_scheme, "prob": model_cfg.cond_drop_prob},
    }

    def export(folder: Path, weights: dict[str, torch.Tensor], info: dict) -> None:
        provenance = provenance_json(
            "dit", info, denoiser=cfg.stage.denoiser, **frozen_vae_provenance(vae_dir, cfg.data),
            weights="ema" if cfg.ema.enabled else "raw",
        )  # fmt: skip
        extra = {
            "conditions.json": json.dumps(conditions, indent=2),
            "latent_stats.json": json.dumps(stats, indent=2),
            "genes.tsv": (vae_dir / "genes.tsv").read_text(),
            "provenance.json": provenance,
        }
        write_export(folder, weights, {"denoiser": cfg.stage.denoiser, **asdict(model_cfg)}, extra)

    return export


def _denoiser(cfg: DiTStageConfig, vae_cfg: VAEConfig, vocab: list[int]):
    derived = {
        "latent_tokens": vae_cfg.num_inducing_points,
        "latent_dim": vae_cfg.latent_dim,
        "vocab_sizes": vocab,
    }
    if cfg.stage.denoiser == "dit":
        model_cfg = replace(cfg.model, **derived)
        return DiT(model_cfg), model_cfg
    model_cfg = replace(cfg.skip_mlp, **derived)
    return SkipMLP(model_cfg), model_cfg


def latent_source(cfg: DiTStageConfig, vae: VAE, vae_dir: Path, train: CellStream, device):
    """Return (encode(batch, device) -> z (B, M, D) fp32, standardisation stats)."""
    cells = cfg.stage.latent_stats_cells
    if cfg.stage.latents == "cache":
        cache = build_cache(vae, vae_dir, cfg.data, run_dir_of(cfg) / "latent_cache", device)
        stats = cache_stats(cache, train.source.joinids, cells)
        return (lambda batch, dev: lookup(cache, batch.soma_joinid, dev)), stats

    def encode(batch: CsrBatch, dev: torch.device) -> torch.Tensor:
        return vae.encode(cell_batch(batch, dev)).float()  # posterior mean

    return encode, latent_stats(vae, cfg.data, cells, device)


def build_stage(cfg: DiTStageConfig, device: torch.device) -> tuple[Stage, DiTStageConfig]:
    """Return the denoiser stage and the config with derived values filled in."""
    vae_dir = vae_export_dir(cfg)
    vae, provenance = load_frozen_vae(vae_dir, device)
    source = cfg.data.source or provenance.get("data_source", "")
    data = replace(cfg.data, source=source, micro_batch=cfg.batch.micro_cells)
    data = replace(data, source=resolve_source(data, cfg.run.root))
    genes = Path(data.vocab_path) if data.vocab_path else Path(data.source) / "genes.tsv"
    if genes.read_text() != (vae_dir / "genes.tsv").read_text():
        raise ConfigError(
            f"the gene vocabulary of {data.source} differs from the VAE's ({vae_dir})"
        )
    labels = json.loads((Path(data.source) / "labels.json").read_text())
    missing = [c for c in data.condition_columns if c not in labels]
    if missing:
        raise ConfigError(f"data.condition_columns {missing} are not in the copy's labels.json")
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model, model_cfg = _denoiser(cfg, vae.cfg, [len(labels[c]) for c in data.condition_columns])
    ema_model = copy.deepcopy(model).to(device).requires_grad_(False)
    cfg = replace(cfg, data=data)
    train, val, closers = open_streams(data)
    encode, stats = latent_source(cfg, vae, vae_dir, train, device)
    evaluate = None
    if val is not None:
        evaluate = make_flow_eval(encode, stats, val, ema_model, cfg.run.seed)
    stage = Stage(
        name="dit", model=model, loss_fn=make_flow_loss(encode, stats), train_stream=train,
        export_fn=make_dit_export(cfg, model_cfg, labels, stats, vae_dir), eval_fn=evaluate,
        use_ema=cfg.ema.enabled, client_extra={"labels": labels, "latent_stats": stats},
        closers=closers, flops_fn=denoiser_flops_fn(model_cfg),
    )  # fmt: skip
    return stage, cfg


def main(argv: Sequence[str] | None = None, export_only: bool = False) -> dict:
    """Train (or, with `export_only`, export) the denoiser; return the final validation metrics."""
    return stage_main(DiTStageConfig, build_stage, argv, export_only)

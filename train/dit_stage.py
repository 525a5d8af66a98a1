"""Stage 2: frozen VAE encoder + DiT (or skip-MLP) denoiser trained with flow matching.

Loads the VAE **export** (not a checkpoint), freezes it and encodes each micro-batch on the fly
(posterior mean) or reads a latent cache (`train/latents.py`). Latents are standardised with a
scalar mean/std estimated once from training cells (saved as `latent_stats.json` in the export).
Conditions come from `data.condition_columns`; condition dropout follows the denoiser config; an
EMA of the weights is evaluated and exported.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from atlasldm.data.batch import CsrBatch
from atlasldm.data.config import DataConfig
from atlasldm.data.stream import CellStream
from atlasldm.data.vocab import GeneVocab
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.flow import flow_loss
from atlasldm.models.skip_mlp import SkipMLP, SkipMLPConfig
from atlasldm.models.vae import VAEConfig
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
from atlasldm.train.distributed import all_reduce_mean, rank
from atlasldm.train.export import provenance_json, write_export
from atlasldm.train.frozen_vae import FrozenVAE, FrozenVAEConfig, load_frozen_vae, vae_export_dir
from atlasldm.train.latents import LatentSource, latent_source
from atlasldm.train.runner import stage_main
from atlasldm.train.stage import Stage
from atlasldm.train.step import step_generator
from atlasldm.train.streams import open_streams, resolve_source
from atlasldm.train.throughput import denoiser_flops_fn


@dataclass
class DenoiserStageConfig(FrozenVAEConfig):
    """What stage 2 trains and on which VAE."""

    denoiser: Literal["dit", "skip_mlp"] = "dit"  # adaLN-Zero DiT or scDiffusion-style MLP


@dataclass
class DiTStageConfig(TrainConfig):
    """Stage-2 schema: run-level sections + data + denoiser configs (CPU-sized defaults)."""

    run: RunConfig = field(
        default_factory=lambda: RunConfig(name="dit", max_steps=200, eval_every=100)
    )  # identity, seed, length; CPU-sized
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


def make_flow_loss(latents: LatentSource):
    """Return the training loss: flow matching on standardised latents with condition dropout."""

    def loss_fn(module: nn.Module, batch: CsrBatch, gen: torch.Generator):
        device = next(module.parameters()).device
        with torch.no_grad():
            z = latents.standardised(batch, device)
        labels = module.drop_labels(batch.conditions, gen).to(device)  # CPU draws (resume)
        return flow_loss(module, z, labels, t_generator=gen), {}

    return loss_fn


def make_flow_eval(latents: LatentSource, val: CellStream, ema_model: nn.Module, seed: int):
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
            z = latents.standardised(batch, device)
            labels = batch.conditions.to(device)
            for key, net in nets.items():  # same t and noise for both weight sets
                gen = step_generator(seed, 0, rank(), i)
                sums[key] += float(flow_loss(net, z, labels, t_generator=gen)) * batch.num_cells
            sums["n"] += batch.num_cells
        mean = all_reduce_mean(sums)
        return {k: v / max(mean["n"], 1e-12) for k, v in mean.items() if k != "n"}

    return evaluate


def conditions_json(columns: list[str], labels: dict, model_cfg: DiTConfig | SkipMLPConfig) -> str:
    """Return the export's conditions.json: columns, vocabularies, null codes, dropout."""
    conditions = {
        "columns": columns,
        "vocabularies": {c: labels[c] for c in columns},
        "null_indices": {c: len(labels[c]) for c in columns},
        "dropout": {"scheme": model_cfg.cfg_dropout_scheme, "prob": model_cfg.cond_drop_prob},
    }
    return json.dumps(conditions, indent=2)


def make_dit_export(cfg: DiTStageConfig, model_cfg, side_files: dict[str, str], vae: FrozenVAE):
    """Return the export function: EMA weights, config.json, `side_files`, provenance.json.

    `side_files` are the files fixed when the stage is built: conditions.json,
    latent_stats.json and the VAE's genes.tsv.
    """

    def export(folder: Path, weights: dict[str, torch.Tensor], info: dict) -> None:
        provenance = provenance_json(
            "dit",
            info,
            denoiser=cfg.stage.denoiser,
            **vae.provenance_fields(cfg.data),
            weights="ema" if cfg.ema.enabled else "raw",
        )
        extra = {**side_files, "provenance.json": provenance}
        write_export(folder, weights, {"denoiser": cfg.stage.denoiser, **asdict(model_cfg)}, extra)

    return export


def _denoiser(cfg: DiTStageConfig, vae_cfg: VAEConfig, vocab: list[int]):
    derived = {
        "num_latent_tokens": vae_cfg.num_latent_tokens,
        "latent_dim": vae_cfg.latent_dim,
        "vocab_sizes": vocab,
    }
    if cfg.stage.denoiser == "dit":
        model_cfg = replace(cfg.model, **derived)
        return DiT(model_cfg), model_cfg
    model_cfg = replace(cfg.skip_mlp, **derived)
    return SkipMLP(model_cfg), model_cfg


def build_stage(cfg: DiTStageConfig, device: torch.device) -> tuple[Stage, DiTStageConfig]:
    """Return the denoiser stage and the config with derived values filled in."""
    vae = load_frozen_vae(vae_export_dir(cfg.stage, cfg.run.root), device)
    source = cfg.data.source or vae.provenance.get("data_source", "")
    data = replace(cfg.data, source=source, micro_batch=cfg.batch.micro_cells)
    data = replace(data, source=resolve_source(data, cfg.run.root))
    genes = Path(data.vocab_path) if data.vocab_path else Path(data.source) / "genes.tsv"
    vae_genes = (vae.folder / "genes.tsv").read_text()
    if GeneVocab.read(genes) != GeneVocab.read(vae.folder / "genes.tsv"):
        raise ConfigError(
            f"the gene vocabulary of {data.source} differs from the VAE's ({vae.folder})"
        )
    labels = json.loads((Path(data.source) / "labels.json").read_text())
    missing = [c for c in data.condition_columns if c not in labels]
    if missing:
        raise ConfigError(f"data.condition_columns {missing} are not in the copy's labels.json")
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    vocab = [len(labels[c]) for c in data.condition_columns]
    model, model_cfg = _denoiser(cfg, vae.model.config, vocab)
    ema_model = copy.deepcopy(model).to(device).requires_grad_(False)
    cfg = replace(cfg, data=data)
    train, val, closers = open_streams(data)
    latents = latent_source(cfg, vae, train)
    evaluate = None
    if val is not None:
        evaluate = make_flow_eval(latents, val, ema_model, cfg.run.seed)
    side_files = {
        "conditions.json": conditions_json(list(data.condition_columns), labels, model_cfg),
        "latent_stats.json": json.dumps(latents.stats, indent=2),
        "genes.tsv": vae_genes,
    }
    stage = Stage(
        name="dit",
        model=model,
        loss_fn=make_flow_loss(latents),
        train_stream=train,
        export_fn=make_dit_export(cfg, model_cfg, side_files, vae),
        eval_fn=evaluate,
        use_ema=cfg.ema.enabled,
        client_extra={"labels": labels, "latent_stats": latents.stats},
        closers=closers,
        flops_fn=denoiser_flops_fn(model_cfg),
    )
    return stage, cfg


def main(argv: Sequence[str] | None = None, export_only: bool = False) -> dict:
    """Train (or, with `export_only`, export) the denoiser; return the final validation metrics."""
    return stage_main(DiTStageConfig, build_stage, argv, export_only)

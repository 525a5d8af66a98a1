"""Noisy-latent classifier for classifier guidance: frozen VAE latents -> one attribute's label.

Uses the frozen VAE and its latents as the denoiser stage does (`train/frozen_vae.py`,
`train/latents.py`: export loading, on-the-fly encoding or the latent cache, scalar
standardisation). One run trains the classifier of one attribute (`stage.attribute`); train one
run per attribute that guidance should use.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from atlasldm.data.batch import CsrBatch
from atlasldm.data.config import DataConfig
from atlasldm.data.stream import CellStream
from atlasldm.models.classifier import ClassifierConfig, NoisyLatentClassifier, classifier_loss
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
from atlasldm.train.frozen_vae import FrozenVAE, FrozenVAEConfig, load_frozen_vae, vae_export_dir
from atlasldm.train.latents import LatentSource, latent_source
from atlasldm.train.runner import stage_main
from atlasldm.train.stage import Stage
from atlasldm.train.step import step_generator
from atlasldm.train.streams import open_streams, resolve_source


@dataclass
class ClassifierStageConfig(FrozenVAEConfig):
    """Which attribute to classify and on which VAE (the VAE fields are the DiT stage's too)."""

    attribute: str = "cell_type"  # obs column whose label the classifier predicts


@dataclass
class ClassifierTrainConfig(TrainConfig):
    """Schema of a classifier run: run-level sections + data + classifier (CPU-sized defaults)."""

    run: RunConfig = field(
        default_factory=lambda: RunConfig(name="classifier", max_steps=200, eval_every=100)
    )  # identity, seed, length
    batch: BatchConfig = field(
        default_factory=lambda: BatchConfig(global_cells=128, micro_cells=32)
    )  # divides by 1, 2 and 4 ranks
    precision: PrecisionConfig = field(default_factory=lambda: PrecisionConfig(dtype="fp32"))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=100))
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(every_steps=20))
    data: DataConfig = field(
        default_factory=lambda: DataConfig(val_fraction=0.1, drop_last=True)
    )  # condition_columns is set to [stage.attribute]
    stage: ClassifierStageConfig = field(default_factory=ClassifierStageConfig)  # attribute, VAE
    model: ClassifierConfig = field(default_factory=ClassifierConfig)  # M, D, classes derived


def make_classifier_loss(latents: LatentSource):
    """Return the training loss: cross-entropy of the label on noisy standardised latents."""

    def loss_fn(module: nn.Module, batch: CsrBatch, gen: torch.Generator):
        device = next(module.parameters()).device
        with torch.no_grad():
            z = latents.standardised(batch, device)
        loss, metrics = classifier_loss(module, z, batch.conditions[:, 0].to(device), gen)
        return loss, {k: float(v) for k, v in metrics.items()}

    return loss_fn


def _make_eval(latents: LatentSource, val: CellStream, seed: int):
    def evaluate(module: nn.Module, ema_state: dict | None) -> dict[str, float]:
        sums = {"loss": 0.0, "accuracy": 0.0, "n": 0.0}
        device = next(module.parameters()).device
        for i, batch in enumerate(val.iter_eval()):
            if batch.num_cells == 0:
                continue
            z = latents.standardised(batch, device)
            gen = step_generator(seed, 0, rank(), i)  # fixed t and noise across evaluations
            loss, metrics = classifier_loss(module, z, batch.conditions[:, 0].to(device), gen)
            sums["loss"] += float(loss) * batch.num_cells
            sums["accuracy"] += float(metrics["accuracy"]) * batch.num_cells
            sums["n"] += batch.num_cells
        mean = all_reduce_mean(sums)
        n = max(mean["n"], 1e-12)
        return {"val/ce": mean["loss"] / n, "val/accuracy": mean["accuracy"] / n}

    return evaluate


def make_classifier_export(
    cfg: ClassifierTrainConfig,
    model_cfg: ClassifierConfig,
    side_files: dict[str, str],
    vae: FrozenVAE,
):
    """Return the export function: weights, config.json, `side_files`, provenance.json.

    `side_files` are the files fixed when the stage is built: conditions.json and
    latent_stats.json.
    """

    def export(folder: Path, weights: dict[str, torch.Tensor], info: dict) -> None:
        fields = vae.provenance_fields(cfg.data)
        extra = {**side_files, "provenance.json": provenance_json("classifier", info, **fields)}
        write_export(folder, weights, asdict(model_cfg), extra)

    return export


def _side_files(attribute: str, values: list[str], stats: dict) -> dict[str, str]:
    conditions = {"attribute": attribute, "values": values, "null_index": len(values)}
    return {
        "conditions.json": json.dumps(conditions, indent=2),
        "latent_stats.json": json.dumps(stats, indent=2),
    }


def build_stage(cfg: ClassifierTrainConfig, device: torch.device):
    """Return the classifier stage and the config with derived values filled in."""
    vae = load_frozen_vae(vae_export_dir(cfg.stage, cfg.run.root), device)
    attribute = cfg.stage.attribute
    data = replace(
        cfg.data,
        source=cfg.data.source or vae.provenance.get("data_source", ""),
        micro_batch=cfg.batch.micro_cells,
        condition_columns=[attribute],
    )
    data = replace(data, source=resolve_source(data, cfg.run.root))
    labels = json.loads((Path(data.source) / "labels.json").read_text())
    if attribute not in labels:
        raise ConfigError(f"stage.attribute {attribute!r} is not in {data.source}/labels.json")
    cfg = replace(cfg, data=data)
    model_cfg = replace(
        cfg.model,
        num_latent_tokens=vae.model.config.num_latent_tokens,
        latent_dim=vae.model.config.latent_dim,
        num_classes=len(labels[attribute]),
    )
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = NoisyLatentClassifier(model_cfg)
    train, val, closers = open_streams(data)
    latents = latent_source(cfg, vae, train)
    evaluate = _make_eval(latents, val, cfg.run.seed) if val is not None else None
    side_files = _side_files(attribute, labels[attribute], latents.stats)
    stage = Stage(
        name="classifier",
        model=model,
        loss_fn=make_classifier_loss(latents),
        train_stream=train,
        export_fn=make_classifier_export(cfg, model_cfg, side_files, vae),
        eval_fn=evaluate,
        client_extra={"labels": labels, "latent_stats": latents.stats},
        closers=closers,
    )
    return stage, cfg


def main(argv: Sequence[str] | None = None, export_only: bool = False) -> dict:
    """Train (or, with `export_only`, export) a classifier; return the final validation metrics."""
    return stage_main(ClassifierTrainConfig, build_stage, argv, export_only)

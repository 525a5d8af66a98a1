"""Noisy-latent classifier for classifier guidance: frozen VAE latents -> one attribute's label.

Shares the frozen-VAE and latent plumbing of `train.dit_stage` (export loading, on-the-fly
encoding or the latent cache, scalar standardisation). One run trains the classifier of one
attribute (`stage.attribute`); train one run per attribute that guidance should use.
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
from atlasldm.train.dit_stage import (
    Encode,
    FrozenVAEConfig,
    frozen_vae_provenance,
    latent_source,
    load_frozen_vae,
    vae_export_dir,
)
from atlasldm.train.export import write_export
from atlasldm.train.loop import LoopConfig, step_generator
from atlasldm.train.stage import Stage, open_streams, provenance_json, resolve_source, stage_main


@dataclass
class ClassifierStageConfig(FrozenVAEConfig):
    """Which attribute to classify and on which VAE (the VAE fields are the DiT stage's)."""

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
    loop: LoopConfig = field(default_factory=LoopConfig)  # NaN guard


def _make_loss(encode: Encode, stats: dict):
    def loss_fn(module: nn.Module, batch: CsrBatch, gen: torch.Generator):
        device = next(module.parameters()).device
        with torch.no_grad():
            z = (encode(batch, device) - stats["mean"]) / stats["std"]
        loss, metrics = classifier_loss(module, z, batch.conditions[:, 0].to(device), gen)
        return loss, {k: float(v) for k, v in metrics.items()}

    return loss_fn


def _make_eval(encode: Encode, stats: dict, val: CellStream, seed: int):
    def evaluate(module: nn.Module, ema_state: dict | None) -> dict[str, float]:
        sums = {"loss": 0.0, "accuracy": 0.0, "n": 0.0}
        device = next(module.parameters()).device
        for i, batch in enumerate(val.iter_eval()):
            if batch.num_cells == 0:
                continue
            z = (encode(batch, device) - stats["mean"]) / stats["std"]
            gen = step_generator(seed, 0, rank(), i)  # fixed t and noise across evaluations
            loss, metrics = classifier_loss(module, z, batch.conditions[:, 0].to(device), gen)
            sums["loss"] += float(loss) * batch.num_cells
            sums["accuracy"] += float(metrics["accuracy"]) * batch.num_cells
            sums["n"] += batch.num_cells
        mean = all_reduce_mean(sums)
        n = max(mean["n"], 1e-12)
        return {"val/ce": mean["loss"] / n, "val/accuracy": mean["accuracy"] / n}

    return evaluate


def _make_export(cfg: ClassifierTrainConfig, model_cfg: ClassifierConfig, labels: list, stats):
    attribute = cfg.stage.attribute
    conditions = {"attribute": attribute, "values": labels, "null_index": len(labels)}

    def export(folder: Path, weights: dict[str, torch.Tensor], info: dict) -> None:
        vae = frozen_vae_provenance(vae_export_dir(cfg), cfg.data)  # type: ignore[arg-type]
        extra = {
            "conditions.json": json.dumps(conditions, indent=2),
            "latent_stats.json": json.dumps(stats, indent=2),
            "provenance.json": provenance_json("classifier", info, **vae),
        }
        write_export(folder, weights, asdict(model_cfg), extra)

    return export


def build_stage(cfg: ClassifierTrainConfig, device: torch.device):
    """Return the classifier stage and the config with derived values filled in."""
    vae_dir = vae_export_dir(cfg)  # type: ignore[arg-type]  # same field names as the DiT's
    vae, provenance = load_frozen_vae(vae_dir, device)
    attribute = cfg.stage.attribute
    data = replace(
        cfg.data,
        source=cfg.data.source or provenance.get("data_source", ""),
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
        latent_tokens=vae.cfg.num_inducing_points,
        latent_dim=vae.cfg.latent_dim,
        num_classes=len(labels[attribute]),
    )
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = NoisyLatentClassifier(model_cfg)
    train, val, closers = open_streams(data)
    encode, stats = latent_source(cfg, vae, vae_dir, train, device)  # type: ignore[arg-type]
    evaluate = _make_eval(encode, stats, val, cfg.run.seed) if val is not None else None
    stage = Stage(
        name="classifier", model=model, loss_fn=_make_loss(encode, stats), train_stream=train,
        export_fn=_make_export(cfg, model_cfg, labels[attribute], stats), eval_fn=evaluate,
        client_extra={"labels": labels, "latent_stats": stats}, closers=closers,
    )  # fmt: skip
    return stage, cfg


def main(argv: Sequence[str] | None = None, export_only: bool = False) -> dict:
    """Train (or, with `export_only`, export) a classifier; return the final validation metrics."""
    return stage_main(ClassifierTrainConfig, build_stage, argv, export_only)

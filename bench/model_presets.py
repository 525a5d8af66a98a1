"""Presets of the model benchmark: shipped YAML files, loaded with the trainer's config loader.

A preset is `configs/bench_model_<name>.yaml` (schema :class:`ModelBenchPreset`). It names the
training recipes whose `model` sections are the benchmarked VAE and DiT (e.g.
`vae_census_70m.yaml`), so every model number lives in the recipe that trains it; the preset
adds only what training derives from the data (the gene vocabulary and the condition classes)
and what to measure (:class:`BenchSettings`). Every file goes through
:func:`atlasldm.train.config.load_config`, typed by the stage schemas, as a training run would.

Command-line overrides: ``vae.<field>=`` and ``dit.<field>=`` (``VAEConfig`` / ``DiTConfig``
fields; lists comma-separated), ``bench.<field>=`` (:class:`BenchSettings`).
"""

from __future__ import annotations

import json
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field

from omegaconf import MISSING

from atlasldm.configs import CONFIGS_DIR, config_path
from atlasldm.models.dit import DiTConfig
from atlasldm.models.vae import VAEConfig
from atlasldm.train.config import load_config
from atlasldm.train.dit_stage import DiTStageConfig
from atlasldm.train.vae_stage import VAEStageConfig

PRESET_PREFIX = "bench_model_"  # configs/bench_model_<preset>.yaml


@dataclass
class BenchSettings:
    """What to measure; a preset's `bench` section and ``bench.<field>=`` override these."""

    train_cells: int = 32  # B of the VAE training-step measurement
    train_expressed: int = 500  # S: expressed genes per synthetic cell (encoder set size)
    train_genes: int = 0  # G decoded in the VAE training step; 0 = the whole vocabulary
    dit_cells: int = 32  # B of the DiT training-step measurement
    warmup: int = 1  # untimed steps before timing
    steps: int = 3  # timed steps
    enc_cells: int = 16  # B of the encoder scan
    enc_genes: list[int] = field(default_factory=lambda: [256, 1024, 4096])  # S values
    max_genes: int = 8192  # padded length of the padded encoder path (REF Census: 8,000)
    enc_reps: int = 5  # timed encoder forwards per S and layout (the best one is reported)
    dec_cells: int = 8  # B of the decoder memory scan
    dec_genes: list[int] = field(default_factory=lambda: [2000, 8192, 36130])  # G values
    dec_chunk: int = 4096  # decode_chunk of the chunked (checkpointed) decoder
    # Decode comparison: today's decode (checkpointed, all genes) against the new defaults and
    # the sampled decode, at each G with S expressed genes per cell (lists of equal length).
    compare_genes: list[int] = field(default_factory=lambda: [2000, 17002, 36130])  # G values
    compare_expressed: list[int] = field(default_factory=lambda: [500, 2000, 2000])  # S per G
    compare_cells: int = 32  # B of the comparison steps
    compare_ks: list[int] = field(default_factory=lambda: [512, 2048, 4096])  # sampled_zeros


@dataclass
class Recipes:
    """Shipped training recipes (names under configs/) whose `model` sections are benchmarked."""

    vae: str = "vae.yaml"  # VAE stage recipe
    dit: str = "dit.yaml"  # DiT stage recipe


@dataclass
class DataShape:
    """What a training run reads from its data, given by the preset for the synthetic cells."""

    num_genes: int = MISSING  # V, the gene vocabulary (training: the copy's genes.tsv)
    vocab_sizes: list[int] = MISSING  # condition classes per attribute (training: the labels)


@dataclass
class ModelBenchPreset:
    """Schema of `configs/bench_model_<name>.yaml`."""

    recipes: Recipes = field(default_factory=Recipes)  # the models
    data: DataShape = field(default_factory=DataShape)  # the synthetic data's shape
    bench: BenchSettings = field(default_factory=BenchSettings)  # what to measure


def preset_names() -> list[str]:
    """The shipped presets, sorted: `bench_model_<name>.yaml` files under configs/."""
    paths = CONFIGS_DIR.glob(f"{PRESET_PREFIX}*.yaml")
    return sorted(p.stem.removeprefix(PRESET_PREFIX) for p in paths)


def _list_field(schema: type, name: str) -> bool:
    hint = typing.get_type_hints(schema).get(name)
    return typing.get_origin(hint) in (list, tuple)


def split_overrides(overrides: Sequence[str]) -> dict[str, list[str]]:
    """Group ``vae.k=v`` / ``dit.k=v`` / ``bench.k=v`` into loader dotlists, per group.

    Keys keep their field name (``k=v``); a comma-separated value of a list field becomes a
    YAML list, so ``bench.dec_genes=100,200`` reads as ``[100, 200]``.
    """
    schemas = {"vae": VAEConfig, "dit": DiTConfig, "bench": BenchSettings}
    groups: dict[str, list[str]] = {name: [] for name in schemas}
    for item in overrides:
        key, sep, raw = item.partition("=")
        group, _, name = key.partition(".")
        if not sep or group not in schemas or not name:
            raise ValueError(f"override {item!r}: expected vae.|dit.|bench.<field>=<value>")
        if _list_field(schemas[group], name) and not raw.startswith("["):
            raw = f"[{raw}]"
        groups[group].append(f"{name}={raw}")
    return groups


def _model_overrides(values: dict[str, object]) -> list[str]:
    """`model.<field>=<value>` lines of a stage recipe; JSON values read back as YAML."""
    return [f"model.{name}={json.dumps(value)}" for name, value in values.items()]


def load_preset(name: str, bench_overrides: Sequence[str], quick: bool) -> ModelBenchPreset:
    """Load `configs/bench_model_<name>.yaml`; `quick` shortens the runs before the overrides."""
    path = config_path(f"{PRESET_PREFIX}{name}.yaml")
    preset = load_config(ModelBenchPreset, [path])
    first = []
    if quick:
        steps = min(preset.bench.steps, 2)
        first = ["bench.warmup=1", f"bench.steps={steps}", "bench.enc_reps=2"]
    overrides = [*first, *(f"bench.{item}" for item in bench_overrides)]
    return load_config(ModelBenchPreset, [path], overrides)


def build_configs(
    preset_name: str, overrides: Sequence[str], quick: bool
) -> tuple[VAEConfig, DiTConfig, BenchSettings]:
    """Preset -> configs; the DiT's M and D follow the (overridden) VAE unless set explicitly.

    Order, later wins: the recipe's `model` section, the preset's data shape, the overrides.
    """
    groups = split_overrides(overrides)
    preset = load_preset(preset_name, groups["bench"], quick)
    vae_lines = _model_overrides({"num_genes": preset.data.num_genes})
    vae_lines += [f"model.{item}" for item in groups["vae"]]
    vae = load_config(VAEStageConfig, [config_path(preset.recipes.vae)], vae_lines).model
    tokens = {"num_latent_tokens": vae.num_latent_tokens, "latent_dim": vae.latent_dim}
    dit_lines = _model_overrides(tokens | {"vocab_sizes": preset.data.vocab_sizes})
    dit_lines += [f"model.{item}" for item in groups["dit"]]
    dit = load_config(DiTStageConfig, [config_path(preset.recipes.dit)], dit_lines).model
    return vae, dit, preset.bench

"""Every committed YAML loads against its stage schema, a typo in a key fails loudly, and the
old names of renamed model fields still load, with a deprecation warning."""

import dataclasses
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from atlasldm.bench.model_presets import ModelBenchPreset
from atlasldm.models.classifier import ClassifierConfig
from atlasldm.models.config_names import (
    DeprecatedNameWarning,
    deprecated_names,
    upgrade_config_tree,
)
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.skip_mlp import SkipMLPConfig
from atlasldm.models.vae import VAE, VAEConfig
from atlasldm.train.classifier_stage import ClassifierTrainConfig
from atlasldm.train.config import ConfigError, load_config
from atlasldm.train.dit_stage import DiTStageConfig
from atlasldm.train.vae_stage import VAEStageConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCHEMAS = {
    "vae.yaml": [VAEStageConfig],
    "vae_census_70m.yaml": [VAEStageConfig],
    "dit.yaml": [DiTStageConfig],
    "classifier.yaml": [ClassifierTrainConfig],
    "debug.yaml": [VAEStageConfig, DiTStageConfig, ClassifierTrainConfig],
    "e2e/vae.yaml": [VAEStageConfig],
    "e2e/dit.yaml": [DiTStageConfig],
    "e2e/skip_mlp.yaml": [DiTStageConfig],
    "e2e/classifier.yaml": [ClassifierTrainConfig],
    "bench_model_reference.yaml": [ModelBenchPreset],
    "bench_model_census70m.yaml": [ModelBenchPreset],
    "scale_study/vae.yaml": [VAEStageConfig],
    "scale_study/dit.yaml": [DiTStageConfig],
}
# Profiles: one section per e2e stage, each layered over that stage's recipe.
E2E_STAGES = {
    "vae": VAEStageConfig,
    "dit": DiTStageConfig,
    "skip_mlp": DiTStageConfig,
    "classifier": ClassifierTrainConfig,
}
PROFILES = ("e2e/full.yaml",)


def test_every_yaml_has_a_schema() -> None:
    found = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
    assert found == sorted([*SCHEMAS, *PROFILES])


@pytest.mark.parametrize("name", PROFILES)
def test_profile_sections_load_over_their_recipes(name: str, tmp_path) -> None:
    tree = OmegaConf.to_container(OmegaConf.load(CONFIGS / name))
    assert set(tree) <= {*E2E_STAGES, "generate"}, sorted(tree)
    for stage, section in tree.items():
        if stage == "generate":
            continue
        overlay = tmp_path / f"{stage}.yaml"
        overlay.write_text(OmegaConf.to_yaml(OmegaConf.create(section)))
        schema = E2E_STAGES[stage]
        cfg = load_config(schema, [CONFIGS / "e2e" / f"{stage}.yaml", overlay])
        for key, value in section.get("run", {}).items():
            assert getattr(cfg.run, key) == value, (stage, key)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_yaml_loads(name: str) -> None:
    for schema in SCHEMAS[name]:
        cfg = load_config(schema, [CONFIGS / name])
        assert isinstance(cfg, schema)


def test_misspelt_key_names_the_key(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lrr: 0.1}\n")
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(VAEStageConfig, [bad])


# ----- renamed model-config fields (models.config_names) -------------------------------------
MODEL_CONFIGS = [VAEConfig, DiTConfig, SkipMLPConfig, ClassifierConfig]
# The old names of every renamed field, as a YAML written before the rename would hold them.
OLD_DIT_YAML = """
model: {latent_tokens: 4, hidden_dim: 32, freq_dim: 16, attn_backend: reference, num_layers: 1,
        num_heads: 2}
skip_mlp: {latent_tokens: 4, hidden_dims: [16, 8], head_dim: 8}
"""
NEW_DIT_YAML = """
model: {num_latent_tokens: 4, embed_dim: 32, time_freq_dim: 16, attention_backend: reference,
        num_layers: 1, num_heads: 2}
skip_mlp: {num_latent_tokens: 4, hidden_dims: [16, 8], head_dim: 8}
"""
OLD_VAE_YAML = "model: {num_inducing_points: 4, embed_dim: 16, num_layers: 1, num_heads: 2}\n"
NEW_VAE_YAML = "model: {num_latent_tokens: 4, embed_dim: 16, num_layers: 1, num_heads: 2}\n"


def _tree(text: str) -> dict:
    return OmegaConf.to_container(OmegaConf.create(text))


def test_shared_concepts_have_one_name_in_every_model_config() -> None:
    """M, D, width, depth, heads and the attention kernel are spelt alike in the VAE and DiT."""
    fields = {cls: {f.name for f in dataclasses.fields(cls)} for cls in MODEL_CONFIGS}
    for cls in MODEL_CONFIGS:
        assert {"num_latent_tokens", "latent_dim", "norm_eps"} <= fields[cls], cls.__name__
    transformer = {"embed_dim", "num_layers", "num_heads", "attention_backend", "multiple_of"}
    assert transformer <= fields[VAEConfig] and transformer <= fields[DiTConfig]
    assert "time_freq_dim" in fields[DiTConfig] & fields[SkipMLPConfig] & fields[ClassifierConfig]


@pytest.mark.parametrize("cls", MODEL_CONFIGS, ids=lambda c: c.__name__)
def test_deprecated_names_map_old_non_fields_to_fields(cls) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    renames = deprecated_names(cls)
    assert renames, f"{cls.__name__} lists no renamed fields"
    assert set(renames.values()) <= names and not set(renames) & names


def _model(schema: type, cfg) -> dict[str, torch.Tensor]:
    """State dict of the stage's model built from `cfg` at a fixed seed."""
    torch.manual_seed(0)
    if schema is VAEStageConfig:
        return VAE(replace(cfg.model, num_genes=20)).state_dict()
    return DiT(cfg.model).state_dict()


@pytest.mark.parametrize(
    ("schema", "old", "new", "count", "renamed"),
    [
        (DiTStageConfig, OLD_DIT_YAML, NEW_DIT_YAML, 5, ["model.hidden_dim", "model.embed_dim"]),
        (VAEStageConfig, OLD_VAE_YAML, NEW_VAE_YAML, 1, ["model.num_inducing_points"]),
    ],
    ids=["dit", "vae"],
)
def test_old_names_in_a_yaml_dict_give_the_same_model(schema, old, new, count, renamed) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        upgraded = upgrade_config_tree(schema, _tree(old), where="old.yaml")
    messages = [str(w.message) for w in caught if w.category is DeprecatedNameWarning]
    assert len(messages) == len(set(messages)) == count  # one line per old key
    assert all("old.yaml" in m for m in messages)
    assert any(all(f"'{key}'" in m for key in renamed) for m in messages)
    assert upgraded == _tree(new)
    structured = OmegaConf.structured(schema)  # what train/config.py merges a YAML into
    got = OmegaConf.to_object(OmegaConf.merge(structured, upgraded))
    want = OmegaConf.to_object(OmegaConf.merge(structured, _tree(new)))
    assert got.model == want.model
    a, b = _model(schema, got), _model(schema, want)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_old_names_in_overrides_are_renamed() -> None:
    dotlist = OmegaConf.to_container(OmegaConf.from_dotlist(["model.hidden_dim=64", "run.seed=3"]))
    with pytest.warns(DeprecatedNameWarning, match=r"'model\.hidden_dim'.*'model\.embed_dim'"):
        upgraded = upgrade_config_tree(DiTStageConfig, dotlist)
    assert upgraded == {"model": {"embed_dim": 64}, "run": {"seed": 3}}


def test_old_and_new_name_together_are_refused() -> None:
    with pytest.raises(ValueError, match="model.hidden_dim.*model.embed_dim"):
        upgrade_config_tree(DiTStageConfig, {"model": {"hidden_dim": 8, "embed_dim": 8}})


def test_new_names_pass_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert upgrade_config_tree(DiTStageConfig, _tree(NEW_DIT_YAML)) == _tree(NEW_DIT_YAML)


def test_load_config_reads_old_names_with_a_warning(tmp_path) -> None:
    """An old run folder's config.yaml and old key=value overrides keep loading."""
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(OLD_DIT_YAML)
    new.write_text(NEW_DIT_YAML)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = load_config(DiTStageConfig, [old], ["model.freq_dim=8"])
    messages = [str(w.message) for w in caught if w.category is DeprecatedNameWarning]
    assert len(messages) == 6 and any("'model.freq_dim'" in m for m in messages)
    assert got == load_config(DiTStageConfig, [new], ["model.time_freq_dim=8"])

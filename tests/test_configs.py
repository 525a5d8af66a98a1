"""Every committed YAML loads against its stage schema, and a typo in a key fails loudly."""

from pathlib import Path

import pytest

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
}


def test_every_yaml_has_a_schema() -> None:
    found = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
    assert found == sorted(SCHEMAS)


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

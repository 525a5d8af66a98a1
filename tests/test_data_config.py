"""DataConfig schema: defaults, YAML/override loading, typos and cross-field checks."""

from __future__ import annotations

import pytest

from atlasldm.data.config import DataConfig
from atlasldm.train.config import ConfigError, load_config


def test_defaults_and_derived_chunk():
    cfg = load_config(DataConfig)
    assert cfg.mode == "copy" and cfg.effective_chunk_cells == 256
    assert cfg.memory_budget_gb == 4.0 and cfg.reader_threads == 2 and cfg.max_genes == 8192
    direct = load_config(DataConfig, overrides=["mode=direct", "vocab_path=genes.tsv"])
    assert direct.effective_chunk_cells == 512


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("micro_batch: 128\ncondition_columns: [cell_type, dataset_id]\n")
    cfg = load_config(DataConfig, [path], ["seed=7", "split_key=donor_id"])
    assert cfg.micro_batch == 128 and cfg.seed == 7 and cfg.split_key == "donor_id"
    assert cfg.condition_columns == ["cell_type", "dataset_id"]


def test_typo_in_key_names_the_key(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("micro_bach: 128\n")
    with pytest.raises(ConfigError, match="micro_bach"):
        load_config(DataConfig, [path])
    with pytest.raises(ConfigError, match="chunk_cell"):
        load_config(DataConfig, overrides=["chunk_cell=64"])


def test_bad_enum_value():
    with pytest.raises(ConfigError, match="elastic"):
        load_config(DataConfig, overrides=["elastic=replay"])
    with pytest.raises(ConfigError, match="unknown_genes"):
        load_config(DataConfig, overrides=["unknown_genes=ignore"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["chunk_cells=100", "chunks_per_rank_round=3", "micro_batch=64"],
            "multiple of micro_batch",
        ),
        (["min_genes=10", "max_genes=5"], "min_genes"),
        (["val_fraction=1.0"], "val_fraction"),
        (["vocab_path=genes.tsv"], "vocab_path"),
        (["micro_batch=0"], "micro_batch"),
    ],
)
def test_cross_field_checks(overrides, message):
    with pytest.raises((ValueError, ConfigError), match=message):
        load_config(DataConfig, overrides=overrides)

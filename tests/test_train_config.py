"""Run-level config: batch arithmetic, unknown keys, enums and the generated DeepSpeed JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from atlasldm.train.config import (
    BatchConfig,
    ConfigError,
    TrainConfig,
    accumulation_steps,
    load_config,
    to_yaml,
)
from atlasldm.train.distributed import deepspeed_config, save_deepspeed_config


def test_accumulation_is_derived_and_checked():
    assert accumulation_steps(BatchConfig(global_cells=1024, micro_cells=128), 2) == 4
    with pytest.raises(
        ConfigError, match=r"global_cells = 1000 .*micro_cells \(128\).*world size \(2\) = 256"
    ):
        accumulation_steps(BatchConfig(global_cells=1000, micro_cells=128), 2)


def test_unknown_key_and_bad_enum_are_named():
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(TrainConfig, [], ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"precision\.dtype"):
        load_config(TrainConfig, [], ["precision.dtype=fp8"])
    with pytest.raises(ConfigError, match=r"zero\.stage"):
        load_config(TrainConfig, [], ["zero.stage=4"])
    with pytest.raises(ConfigError, match=r"warmup_frac \+ optim\.decay_frac"):
        load_config(TrainConfig, [], ["optim.warmup_frac=0.6", "optim.decay_frac=0.6"])


@dataclass
class ToyModel:
    width: int = 8  # toy width


@dataclass
class StageConfig(TrainConfig):
    model: ToyModel = field(default_factory=ToyModel)  # the stage adds its model section


def test_yaml_then_overrides_and_stage_composition(tmp_path):
    yaml = tmp_path / "stage.yaml"
    yaml.write_text("model: {width: 16}\nbatch: {global_cells: 64, micro_cells: 8}\n")
    cfg = load_config(StageConfig, [yaml], ["optim.lr=5e-4", "run.name=x"])
    assert (cfg.model.width, cfg.batch.global_cells, cfg.optim.lr, cfg.run.name) == (
        16,
        64,
        5e-4,
        "x",
    )
    assert cfg.optim.betas == (0.9, 0.95)
    assert "width: 16" in to_yaml(cfg)


def test_generated_deepspeed_json(tmp_path):
    cfg = load_config(
        TrainConfig,
        [],
        ["batch.global_cells=512", "batch.micro_cells=64", "zero.stage=3", "optim.grad_clip=1.5"],
    )
    ds = deepspeed_config(cfg, world=4)
    assert ds["train_batch_size"] == 512
    assert ds["train_micro_batch_size_per_gpu"] == 64
    assert ds["gradient_accumulation_steps"] == 2  # 512 = 64 x 2 x 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 1.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "optimizer" not in ds and "scheduler" not in ds  # ours, not DeepSpeed's
    assert "checkpoint" not in ds
    assert deepspeed_config(cfg, 4, load_universal=True)["checkpoint"]["load_universal"]
    path = save_deepspeed_config(ds, tmp_path)
    assert json.loads(path.read_text()) == ds
    with pytest.raises(ConfigError, match="global_cells"):
        deepspeed_config(cfg, world=3)

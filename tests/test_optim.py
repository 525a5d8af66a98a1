"""Parameter groups, LR schedules (pure functions of the step) and the EMA update."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from atlasldm.train.config import EMAConfig, OptimConfig
from atlasldm.train.optim import EMA, build_optimizer, lr_at, param_groups, set_lr


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.gene_embed_table = nn.Parameter(torch.zeros(10, 4))  # 2-D but not a module embed
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.rms = RMSNorm(4)
        self.out = nn.Linear(4, 2, bias=False)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_exclude_norms_biases_embeddings():
    model = Toy()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert _names(model, decay) == {"gene_embed_table", "proj.weight", "out.weight"}
    assert _names(model, no_decay) == {
        "embed.weight",
        "proj.bias",
        "norm.weight",
        "norm.bias",
        "rms.weight",
    }
    opt = build_optimizer(model, OptimConfig(lr=3e-4, weight_decay=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    set_lr(opt.param_groups, 1e-5)
    assert all(g["lr"] == 1e-5 for g in opt.param_groups)


def test_wsd_schedule_points():
    cfg = OptimConfig(lr=1e-3, schedule="wsd", warmup_frac=0.1, decay_frac=0.1, min_lr_ratio=0.1)
    total = 1000
    assert lr_at(0, cfg, total) == pytest.approx(1e-5)  # warmup starts at lr / 100
    assert lr_at(50, cfg, total) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at(100, cfg, total) == pytest.approx(1e-3)  # peak at the end of warmup
    assert lr_at(500, cfg, total) == pytest.approx(1e-3)  # stable phase
    assert lr_at(900, cfg, total) == pytest.approx(1e-3)  # decay starts at 90 %
    assert lr_at(925, cfg, total) == pytest.approx(1e-4 + 9e-4 * (1 - math.sqrt(0.25)))
    assert lr_at(1000, cfg, total) == pytest.approx(1e-4)  # min_lr_ratio * lr at the end
    lrs = [lr_at(s, cfg, total) for s in range(1001)]
    assert lrs == [lr_at(s, cfg, total) for s in range(1001)]  # pure: same input, same output
    assert all(a <= b for a, b in zip(lrs[:100], lrs[1:101], strict=True))
    assert all(a >= b for a, b in zip(lrs[900:1000], lrs[901:], strict=True))


def test_cosine_schedule_points():
    cfg = OptimConfig(lr=5e-4, schedule="cosine", warmup_frac=0.1, min_lr_ratio=0.1)
    total = 101
    assert lr_at(0, cfg, total) == pytest.approx(5e-6)
    assert lr_at(10, cfg, total) == pytest.approx(5e-4)
    assert lr_at(55, cfg, total) == pytest.approx(5e-5 + 4.5e-4 * 0.5)  # half way: mid value
    assert lr_at(100, cfg, total) == pytest.approx(5e-5)  # last step reaches the floor


def test_ema_copy_then_decay():
    weight = nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA([("w", weight)], EMAConfig(decay=0.9, every=2, start_step=4))
    assert [ema.due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    with torch.no_grad():
        weight.fill_(3.0)
    ema.update([("w", weight)], step=2)  # before start_step: plain copy
    assert torch.equal(ema.state_dict()["w"], torch.tensor([3.0, 3.0]))
    with torch.no_grad():
        weight.fill_(13.0)
    ema.update([("w", weight)], step=4)  # 0.9 * 3 + 0.1 * 13 = 4
    torch.testing.assert_close(ema.state_dict()["w"], torch.tensor([4.0, 4.0]))
    assert ema.state_dict()["w"].dtype == torch.float32
    with pytest.raises(KeyError, match="EMA state"):
        ema.load_state_dict({"other": torch.zeros(2)})

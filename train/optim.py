"""AdamW parameter groups, learning-rate schedules as pure functions of the step, and the EMA.

The learning rate is a function of the optimiser step only (set on the parameter groups every
step), so resuming needs no scheduler state (docs/design.md). Schedules follow docs/model.md
(WSD: warmup from lr/100, hold, sqrt-decay over the last `decay_frac` to `min_lr_ratio * lr`) and
§4.6 (warmup, then cosine to `min_lr_ratio * lr`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from atlasldm.train.config import EMAConfig, OptimConfig

# Modules whose parameters never get weight decay: decaying a norm gain or an embedding row
# pulls it towards 0, which is a change of function rather than a regulariser.
_NO_DECAY_MODULES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.Embedding,
    nn.EmbeddingBag,
)


def _is_no_decay_module(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    # Catches RMSNorm and project-specific norm/embedding classes by name.
    return isinstance(module, _NO_DECAY_MODULES) or "norm" in name or "embed" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Return two AdamW groups: matrices with `weight_decay`, norms/biases/embeddings without.

    A parameter is excluded from decay when it is 1-D (biases, gains) or belongs to a norm or
    embedding module. Frozen parameters (requires_grad False) are left out.
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if _is_no_decay_module(module):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in no_decay_ids:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Return AdamW over `param_groups(model)` at the peak learning rate (reset every step)."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps
    )


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Return the learning rate for optimiser step `step` (0-based) of a `total_steps` run.

    Warmup goes linearly from lr/100 at step 0 to lr at the end of warmup. WSD then holds lr and
    decays over the last `decay_frac` as lr_min + (lr - lr_min) * (1 - sqrt(progress)); cosine
    decays from the end of warmup to the last step as lr_min + (lr - lr_min) * (1 + cos)/2.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    total = max(int(total_steps), 1)
    warmup = int(round(cfg.warmup_frac * total))
    if step < warmup:
        start = peak / 100.0
        return start + (peak - start) * step / warmup
    if cfg.schedule == "wsd":
        decay = int(round(cfg.decay_frac * total))
        decay_start = total - decay
        if step < decay_start or decay == 0:
            return peak
        progress = min((step - decay_start) / decay, 1.0)
        return floor + (peak - floor) * (1.0 - math.sqrt(progress))
    span = max(total - 1 - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(param_groups: Iterable[dict], lr: float) -> None:
    """Set `lr` on every parameter group (call before each optimiser step)."""
    for group in param_groups:
        group["lr"] = lr


class EMA:
    """Plain fp32 copy of the trainable weights, updated every `cfg.every` steps.

    Before `cfg.start_step` an update copies the weights; from then on it applies
    `ema = decay * ema + (1 - decay) * weight`. The caller passes full fp32 weights: with a
    DeepSpeed engine, `train.distributed.master_weights(engine)` (gathered under ZeRO-3, the fp32
    masters under bf16/fp16, whose small updates the 16-bit copies would round away).
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]], cfg: EMAConfig) -> None:
        self.cfg = cfg
        self.shadow = {name: p.detach().float().clone() for name, p in named_params}

    def due(self, step: int) -> bool:
        """Return True when optimiser step `step` (1-based, after the update) updates the EMA."""
        return self.cfg.every > 0 and step % self.cfg.every == 0

    @torch.no_grad()
    def update(self, named_params: Iterable[tuple[str, torch.Tensor]], step: int) -> None:
        """Update the shadow weights from the current (full) parameters at optimiser `step`."""
        copy_only = step < self.cfg.start_step
        for name, param in named_params:
            shadow = self.shadow[name]
            value = param.detach().to(device=shadow.device, dtype=torch.float32)
            if copy_only:
                shadow.copy_(value)
            else:
                shadow.lerp_(value, 1.0 - self.cfg.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return the fp32 shadow weights by parameter name."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore shadow weights; names must match exactly.

        Raises:
            KeyError: names differ (the model changed since the checkpoint).
        """
        if set(state) != set(self.shadow):
            diff = sorted(set(state) ^ set(self.shadow))[:5]
            raise KeyError(f"EMA state does not match the model parameters (e.g. {diff})")
        for name, value in state.items():
            self.shadow[name].copy_(value)

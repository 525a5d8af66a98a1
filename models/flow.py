"""Linear-path flow matching objective and ODE samplers (Euler, Heun, adaptive dopri5).

The network, the objective and the samplers are separate (the DiT/SiT split): any backbone
`model(x, t, labels) -> v` trains with `flow_loss`, and any velocity callable `(x, t) -> v`
(a plain model, an EMA copy, CFG or classifier guidance) integrates with `sample`.

Path (docs/model.md, 'Flow matching'): t = 0 is noise, t = 1 is data, x_t = t·z + (1 − t)·ε,
target u = z − ε. REF is the reference implementation (docs/model.md, 'Tags').

Shape legend (docs/model.md, 'Notation'):
    B  cells
    M  latent tokens
    D  latent width per token
    A  condition attributes (labels (B, A) int64)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SamplerName = Literal["euler", "heun", "dopri5"]
SAMPLERS: tuple[str, ...] = ("euler", "heun", "dopri5")


@dataclass
class FlowConfig:
    """Objective and sampler settings of the flow-matching stage."""

    sampler: SamplerName = "dopri5"  # ODE solver used for generation (REF default dopri5)
    num_steps: int = 50  # uniform grid steps for euler/heun; ignored by dopri5
    atol: float = 1e-5  # dopri5 absolute tolerance (REF default)
    rtol: float = 1e-5  # dopri5 relative tolerance (REF default)
    max_steps: int = 10_000  # dopri5 guard: accepted+rejected steps before raising
    t_start: float = 0.0  # integration start time; > 0 when starting from partially noised cells

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; use one of {SAMPLERS}")
        if self.num_steps < 1 or self.max_steps < 1:
            raise ValueError("num_steps and max_steps must be >= 1")
        if self.atol <= 0 or self.rtol <= 0:
            raise ValueError("atol and rtol must be positive")
        if not 0.0 <= self.t_start < 1.0:
            raise ValueError(f"t_start must be in [0, 1), got {self.t_start}")


@dataclass
class SampleResult:
    """Samples at t = 1 and the solver's cost."""

    x: torch.Tensor  # (B, M, D) samples
    nfe: int  # number of velocity evaluations (each one forward pass of the batch)
    steps: int  # accepted steps (euler/heun: num_steps)
    rejected: int = 0  # dopri5 rejected step attempts


def interpolate(
    z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x_t, u) for data z, noise eps (same shape) and times t (B,): the linear path."""
    tb = t.reshape(-1, *([1] * (z.dim() - 1))).to(z.dtype)  # (B, 1, 1)
    return tb * z + (1.0 - tb) * eps, z - eps


def draw_time_and_noise(
    z: torch.Tensor,
    t_generator: torch.Generator | None = None,
    noise_generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return t ~ U[0, 1] (B,) drawn from t_generator and ε ~ N(0, I) like z from noise_generator.

    Both are drawn on their generator's device (CPU when None) and moved to z's device, so the
    values do not depend on the accelerator; noise_generator defaults to t_generator (t first).
    """
    noise_generator = t_generator if noise_generator is None else noise_generator
    t_dev = t_generator.device if t_generator is not None else torch.device("cpu")
    e_dev = noise_generator.device if noise_generator is not None else torch.device("cpu")
    t = torch.rand(z.shape[0], generator=t_generator, device=t_dev, dtype=torch.float32)
    eps = torch.randn(z.shape, generator=noise_generator, device=e_dev, dtype=torch.float32)
    return t.to(z.device), eps.to(z.device)


def flow_loss(
    model: ModelFn,
    z: torch.Tensor,
    labels: torch.Tensor | None = None,
    t_generator: torch.Generator | None = None,
    noise_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return the flow-matching loss (scalar, fp32): MSE over tokens and dims, mean over cells.

    Args:
        model: backbone called as model(x_t, t, labels) -> v (B, M, D).
        z: clean latents (B, M, D); cast to fp32 for the path.
        labels: (B, A) condition codes after condition dropout, or None.
        t_generator: generator for t; noise_generator: generator for ε (defaults to t_generator).
    """
    z = z.float()
    t, eps = draw_time_and_noise(z, t_generator, noise_generator)
    x_t, u = interpolate(z, eps, t)
    v = model(x_t, t, labels)
    # fp32 island: the model may run under bf16 autocast, the squared error must not.
    per_cell = (v.float() - u).pow(2).flatten(1).mean(dim=1)  # (B,)
    return per_cell.mean()


def velocity_from_model(
    model: nn.Module | ModelFn, labels: torch.Tensor | None = None, ema: nn.Module | None = None
) -> VelocityFn:
    """Return v(x, t) = net(x, t, labels) with net the EMA copy when given, else the model.

    Generation defaults to EMA weights (docs/model.md, 'Samplers'; REF sampled with the raw
    weights, see 'Deviations from the reference'): pass the EMA module.
    """
    net = ema if ema is not None else model

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x, t, labels)

    return velocity


def _time(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (B,)


def _v(velocity: VelocityFn, x: torch.Tensor, t: float) -> torch.Tensor:
    return velocity(x, _time(x, t)).to(x.dtype)


@torch.no_grad()
def sample_euler(
    velocity: VelocityFn, x0: torch.Tensor, num_steps: int, t0: float = 0.0, t1: float = 1.0
) -> SampleResult:
    """Integrate dx/dt = v from t0 to t1 with num_steps Euler steps (num_steps evaluations)."""
    h = (t1 - t0) / num_steps
    x = x0
    for i in range(num_steps):
        x = x + h * _v(velocity, x, t0 + i * h)
    return SampleResult(x=x, nfe=num_steps, steps=num_steps)


@torch.no_grad()
def sample_heun(
    velocity: VelocityFn, x0: torch.Tensor, num_steps: int, t0: float = 0.0, t1: float = 1.0
) -> SampleResult:
    """Integrate with Heun's method (Euler predictor, trapezoid corrector): 2 evaluations/step."""
    h = (t1 - t0) / num_steps
    x = x0
    for i in range(num_steps):
        t = t0 + i * h
        k1 = _v(velocity, x, t)
        k2 = _v(velocity, x + h * k1, t + h)
        x = x + 0.5 * h * (k1 + k2)
    return SampleResult(x=x, nfe=2 * num_steps, steps=num_steps)


# Dormand–Prince 5(4) tableau (Hairer, Nørsett & Wanner, Table 5.2). B5 is the 7th row of A
# (first same as last), so the last stage of an accepted step is the first of the next.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip((*_A[6], 0.0), _B4, strict=True))


def _rms(x: torch.Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


def _worst_cell_rms(x: torch.Tensor) -> float:
    # Max over cells of the per-cell RMS: with one step size for the batch, a whole-batch RMS
    # (torchdiffeq's default) lets a few hard cells exceed the tolerance unnoticed.
    return float(x.float().pow(2).flatten(1).mean(1).sqrt().max())


def _initial_step(
    velocity: VelocityFn, x: torch.Tensor, t: float, f0: torch.Tensor, atol: float, rtol: float
) -> float:
    """Hairer's starting step-size heuristic (one extra evaluation)."""
    scale = atol + rtol * x.abs()
    d0, d1 = _rms(x / scale), _rms(f0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = _v(velocity, x + h0 * f0, t + h0)
    d2 = _rms((f1 - f0) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** 0.2
    return min(100 * h0, h1)


@torch.no_grad()
def sample_dopri5(
    velocity: VelocityFn,
    x0: torch.Tensor,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    t0: float = 0.0,
    t1: float = 1.0,
    max_steps: int = 10_000,
) -> SampleResult:
    """Integrate with adaptive Dormand–Prince 5(4); one step size for the whole batch.

    Error ratio: the worst cell's RMS of err / (atol + rtol·max(|x|, |x'|)) (torchdiffeq uses
    the RMS over the whole batch); step factor 0.9·ratio^(-1/5) clamped to [0.2, 10]. Raises
    RuntimeError after max_steps step attempts.
    """
    x, t = x0, t0
    k1 = _v(velocity, x, t)
    h = min(_initial_step(velocity, x, t, k1, atol, rtol), t1 - t0)
    nfe, accepted, rejected = 2, 0, 0
    while t < t1 - 1e-12:
        if accepted + rejected >= max_steps:
            raise RuntimeError(f"dopri5 exceeded max_steps={max_steps} at t={t:.6f} (h={h:.3g})")
        h = min(h, t1 - t)
        ks = [k1]
        for i in range(1, 7):
            xi = x + h * sum(a * k for a, k in zip(_A[i], ks, strict=False) if a != 0.0)
            ks.append(_v(velocity, xi, t + _C[i] * h))
        nfe += 6
        x_new = xi  # the 7th stage point is the 5th-order solution (FSAL)
        err = h * sum(e * k for e, k in zip(_E, ks, strict=True) if e != 0.0)
        ratio = _worst_cell_rms(err / (atol + rtol * torch.maximum(x.abs(), x_new.abs())))
        if not math.isfinite(ratio):  # shrinking h cannot fix a NaN/inf velocity
            raise FloatingPointError(f"dopri5: non-finite error estimate at t={t:.6f}")
        if ratio <= 1.0:
            x, t, k1 = x_new, t + h, ks[6]
            accepted += 1
        else:
            rejected += 1
        factor = 10.0 if ratio == 0.0 else min(10.0, max(0.2, 0.9 * ratio**-0.2))
        h = h * (min(factor, 1.0) if ratio > 1.0 else factor)
    return SampleResult(x=x, nfe=nfe, steps=accepted, rejected=rejected)


def sample(velocity: VelocityFn, x0: torch.Tensor, config: FlowConfig) -> SampleResult:
    """Integrate dx/dt = v(x, t) from config.t_start to 1 with the configured solver."""
    if config.sampler == "euler":
        return sample_euler(velocity, x0, config.num_steps, t0=config.t_start)
    if config.sampler == "heun":
        return sample_heun(velocity, x0, config.num_steps, t0=config.t_start)
    return sample_dopri5(
        velocity, x0, config.atol, config.rtol, t0=config.t_start, max_steps=config.max_steps
    )

"""Flow objective (target, oracle loss) and samplers against closed-form velocity fields."""

from __future__ import annotations

import math

import pytest
import torch

from atlasldm.models.flow import (
    FlowConfig,
    draw_time_and_noise,
    flow_loss,
    sample,
    sample_dopri5,
    sample_euler,
    sample_heun,
    velocity_from_model,
)

# Target: 2-component Gaussian mixture in 2-D, latents shaped (B, M=1, D=2).
MEANS = torch.tensor([[-3.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
SIGMA = 0.5


def gmm_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact marginal velocity E[z − ε | x_t = x] of the linear path for the GMM target."""
    xf = x.reshape(x.shape[0], -1).double()  # (B, 2)
    tt = t.double()[:, None, None]  # (B, 1, 1)
    mu_t = tt * MEANS[None]  # (B, K, 2)
    var = tt**2 * SIGMA**2 + (1 - tt) ** 2  # (B, 1, 1)
    diff = xf[:, None, :] - mu_t  # (B, K, 2)
    logw = WEIGHTS.log()[None] - 0.5 * (diff**2).sum(-1) / var[..., 0]  # (B, K)
    post = torch.softmax(logw, dim=1)[..., None]  # (B, K, 1)
    u_k = MEANS[None] + (tt * SIGMA**2 - (1 - tt)) * diff / var  # (B, K, 2)
    return (post * u_k).sum(1).reshape(x.shape).to(x.dtype)


def check_gmm(x: torch.Tensor) -> None:
    x = x.reshape(x.shape[0], -1)
    right = x[:, 0] > 0
    assert abs(right.float().mean().item() - WEIGHTS[1].item()) < 0.04
    for k, mask in enumerate([~right, right]):
        pts = x[mask]
        assert (pts.mean(0) - MEANS[k].float()).abs().max() < 0.08
        assert (pts.std(0) - SIGMA).abs().max() < 0.06


def noise(n: int = 3000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 2, generator=torch.Generator().manual_seed(seed))


def test_flow_target_by_hand_and_oracle_loss_zero() -> None:
    z = torch.randn(6, 3, 4)
    seen = {}

    def recorder(x_t, t, labels):
        seen.update(x_t=x_t, t=t, labels=labels)
        return torch.zeros_like(x_t)

    labels = torch.zeros(6, 1, dtype=torch.long)
    loss = flow_loss(recorder, z, labels, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.rand(6, generator=g)  # documented order: t first, then ε, same generator
    eps = torch.randn(z.shape, generator=g)
    u = z - eps
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], t[:, None, None] * z + (1 - t[:, None, None]) * eps)
    assert seen["labels"] is labels
    torch.testing.assert_close(loss, u.pow(2).mean())  # zero model: loss = E|u|^2

    def oracle(x_t, t, labels):
        # x_t = t z + (1 − t) ε  =>  ε = (x_t − t z) / (1 − t), u = z − ε
        tb = t[:, None, None]
        return z - (x_t - tb * z) / (1 - tb)

    assert flow_loss(oracle, z, None, torch.Generator().manual_seed(3)).item() < 1e-10


def test_time_and_noise_generators_are_separate() -> None:
    z = torch.zeros(5, 2, 2)
    t1, e1 = draw_time_and_noise(
        z, torch.Generator().manual_seed(0), torch.Generator().manual_seed(9)
    )
    t2, e2 = draw_time_and_noise(
        z, torch.Generator().manual_seed(0), torch.Generator().manual_seed(8)
    )
    assert torch.equal(t1, t2) and not torch.equal(e1, e2)
    assert ((t1 >= 0) & (t1 < 1)).all()


def test_euler_recovers_gmm_and_honours_num_steps() -> None:
    res = sample_euler(gmm_velocity, noise(), num_steps=200)
    assert res.nfe == 200 and res.steps == 200
    check_gmm(res.x)


def test_heun_recovers_gmm_and_honours_num_steps() -> None:
    res = sample(gmm_velocity, noise(), FlowConfig(sampler="heun", num_steps=40))
    assert res.nfe == 80
    check_gmm(res.x)


def test_dopri5_recovers_gmm_and_matches_fine_heun() -> None:
    x0 = noise(2000)
    res = sample(gmm_velocity, x0, FlowConfig(sampler="dopri5"))
    check_gmm(res.x)
    assert res.nfe == 2 + 6 * (res.steps + res.rejected)  # start heuristic + FSAL stages
    assert 10 < res.nfe < 2000
    # Same trajectories, not just marginals: compare 100 cells with a fine fp64 Heun solution.
    fine = sample_heun(gmm_velocity, x0[:100].double(), num_steps=600).x
    assert (res.x[:100].double() - fine).abs().max() < 1e-3


def test_dopri5_exact_on_linear_ode_and_tolerance_changes_cost() -> None:
    x0 = torch.randn(4, 2, 3, dtype=torch.float64)
    loose = sample_dopri5(lambda x, t: x, x0, atol=1e-3, rtol=1e-3)
    tight = sample_dopri5(lambda x, t: x, x0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(tight.x, x0 * math.e, rtol=1e-7, atol=1e-8)
    assert tight.nfe > loose.nfe
    with pytest.raises(RuntimeError, match="max_steps"):
        sample_dopri5(lambda x, t: x, x0, atol=1e-9, rtol=1e-9, max_steps=2)
    with pytest.raises(FloatingPointError):
        sample_dopri5(lambda x, t: x if t[0] < 0.5 else x * float("nan"), x0)


def test_t_start_and_time_argument_reach_the_velocity() -> None:
    seen = []

    def v(x, t):
        seen.append(float(t[0]))
        return torch.ones_like(x)

    res = sample(v, torch.zeros(2, 1, 1), FlowConfig(sampler="euler", num_steps=4, t_start=0.2))
    assert seen == pytest.approx([0.2, 0.4, 0.6, 0.8])
    torch.testing.assert_close(res.x, torch.full((2, 1, 1), 0.8))


def test_velocity_from_model_prefers_ema() -> None:
    def raw(x, t, labels):
        return torch.zeros_like(x)

    def ema(x, t, labels):
        return torch.ones_like(x) + labels.sum()

    labels = torch.ones(2, 1, dtype=torch.long)
    x, t = torch.zeros(2, 1, 1), torch.zeros(2)
    assert velocity_from_model(raw, labels)(x, t).sum() == 0
    assert velocity_from_model(raw, labels, ema=ema)(x, t).sum() == 2 * 3


def test_flow_config_validation() -> None:
    with pytest.raises(ValueError):
        FlowConfig(sampler="rk4")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FlowConfig(num_steps=0)
    with pytest.raises(ValueError):
        FlowConfig(t_start=1.0)

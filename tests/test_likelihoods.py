"""NB/Gaussian likelihoods: scipy agreement, fp32 under autocast, streaming LSE, sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from atlasldm.models.likelihoods import (
    LikelihoodHead,
    StreamingLogSumExp,
    gaussian_log_prob,
    log1p_cp10k,
    nb_log_prob,
    sample_nb,
)


def test_nb_log_prob_matches_scipy():
    x = torch.tensor([0.0, 1.0, 3.0, 10.0, 250.0, 0.0, 7.0], dtype=torch.float64)
    mu = torch.tensor([0.01, 0.5, 3.0, 20.0, 180.0, 1e3, 1e-4], dtype=torch.float64)
    theta = torch.tensor([0.1, 1.0, 2.718, 5.0, 50.0, 0.5, 1e3], dtype=torch.float64)
    got = nb_log_prob(x, mu.log(), theta.log()).double().numpy()
    th, m = theta.numpy(), mu.numpy()
    want = stats.nbinom.logpmf(x.numpy(), n=th, p=th / (th + m))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_nb_is_fp32_under_bf16_autocast():
    x = torch.tensor([[0.0, 4.0, 12.0]])
    log_mu = torch.tensor([[0.1, 1.3, 2.4]], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nb_log_prob(x, log_mu, torch.zeros(3))
        lse = StreamingLogSumExp()
        lse.update(log_mu)
    assert out.dtype == torch.float32 and lse.result().dtype == torch.float32
    torch.testing.assert_close(out, nb_log_prob(x, log_mu.float(), torch.zeros(3)))


def test_streaming_lse_values_and_gradients():
    torch.manual_seed(0)
    x = (torch.randn(3, 23) * 30).requires_grad_()
    acc = StreamingLogSumExp()
    for s in range(0, 23, 5):
        acc.update(x[:, s : s + 5])
    got = acc.result()
    want = torch.logsumexp(x, dim=1)
    torch.testing.assert_close(got, want)
    w = torch.randn(3)
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    (g_want,) = torch.autograd.grad((want * w).sum(), x)
    torch.testing.assert_close(g_got, g_want)


def test_sampler_moments_and_generator():
    mu = torch.full((20000,), 6.0)
    log_theta = torch.full((20000,), math.log(2.0))
    g = torch.Generator().manual_seed(0)
    x = sample_nb(mu.log(), log_theta, g)
    assert x.dtype == torch.float32 and bool((x == x.round()).all()) and bool((x >= 0).all())
    assert abs(x.mean().item() - 6.0) < 0.15
    assert abs(x.var().item() - (6.0 + 36.0 / 2.0)) < 1.5  # μ + μ²/θ = 24
    state = torch.get_rng_state()
    a = sample_nb(mu[:50].log(), log_theta[:50], torch.Generator().manual_seed(3))
    b = sample_nb(mu[:50].log(), log_theta[:50], torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched


def test_gaussian_and_cp10k():
    x = torch.tensor([[1.0, 0.0, 3.0]])
    y = log1p_cp10k(x, torch.tensor([4.0]))
    torch.testing.assert_close(y, torch.log1p(torch.tensor([[2500.0, 0.0, 7500.0]])))
    lp = gaussian_log_prob(y, y + 1.0)
    torch.testing.assert_close(lp, torch.full_like(y, -0.5 - 0.5 * math.log(2 * math.pi)))


def test_head_theta_init_and_unknown_likelihood():
    head = LikelihoodHead(10, 8, "nb_shared_theta")
    assert head.theta.weight.shape == (11, 1) and bool((head.theta.weight == 1).all())
    assert LikelihoodHead(10, 8, "gaussian").theta is None
    with pytest.raises(ValueError):
        LikelihoodHead(10, 8, "poisson")

"""Classifier-free guidance, classifier guidance and interpolation."""

from __future__ import annotations

import pytest
import torch

from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.embeddings import null_labels
from atlasldm.models.flow import sample_heun
from atlasldm.models.guidance import (
    ClassifierTerm,
    cfg_interpolation_velocity,
    cfg_velocity,
    check_guidance_mode,
    classifier_guided_velocity,
    guidance_factor,
    interpolation_terms,
    noised_start,
)

VOCAB = [3, 2]


@pytest.fixture(scope="module")
def model() -> DiT:
    cfg = DiTConfig(
        num_latent_tokens=3,
        latent_dim=4,
        embed_dim=16,
        num_layers=1,
        num_heads=2,
        vocab_sizes=VOCAB,
    )
    net = DiT(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # leave adaLN-Zero so the velocity depends on x, t and labels
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 4, generator=g)
    t = torch.full((4,), 0.3)
    labels = torch.tensor([[0, 1], [2, 0], [1, 1], [0, 0]])
    return x, t, labels


def only(labels: torch.Tensor, keep: list[int]) -> torch.Tensor:
    out = null_labels(VOCAB, labels.shape[0])
    out[:, keep] = labels[:, keep]
    return out


@torch.no_grad()
def test_zero_weights_give_unconditional(model, batch) -> None:
    x, t, labels = batch
    v_null = model(x, t, None)
    for mode in ("joint", "additive"):
        v = cfg_velocity(model, labels, [0.0, 0.0], VOCAB, mode, "independent")(x, t)
        torch.testing.assert_close(v, v_null, atol=1e-5, rtol=1e-5)
    v = cfg_velocity(model, labels, [None, None], VOCAB, "joint", "independent")(
        x, t
    )  # nothing given
    torch.testing.assert_close(v, v_null, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_unit_weights_give_conditional(model, batch) -> None:
    x, t, labels = batch
    v = cfg_velocity(model, labels, [1.0, 1.0], VOCAB, "joint", "independent")(x, t)
    torch.testing.assert_close(v, model(x, t, labels), atol=1e-5, rtol=1e-5)
    v = cfg_velocity(model, labels, [None, 1.0], VOCAB, "additive", "independent")(x, t)
    torch.testing.assert_close(v, model(x, t, only(labels, [1])), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_stacked_single_forward_equals_separate_forwards(model, batch) -> None:
    x, t, labels = batch
    calls = []

    def counting(xs, ts, ys):
        calls.append(xs.shape[0])
        return model(xs, ts, ys)

    v0 = model(x, t, None)
    v_all, v_a, v_b = (model(x, t, only(labels, k)) for k in ([0, 1], [0], [1]))
    joint = cfg_velocity(counting, labels, [2.0, 0.5], VOCAB, "joint", "independent")(x, t)
    torch.testing.assert_close(joint, v0 + 1.25 * (v_all - v0), atol=1e-5, rtol=1e-5)
    add = cfg_velocity(counting, labels, [2.0, 0.5], VOCAB, "additive", "independent")(x, t)
    expected = v0 + 2.0 * (v_a - v0) + 0.5 * (v_b - v0)
    torch.testing.assert_close(add, expected, atol=1e-5, rtol=1e-5)
    assert calls == [2 * 4, 3 * 4]  # one forward pass per step: 2 and A + 1 stacked copies


def test_guidance_mode_must_match_dropout_scheme(model, batch) -> None:
    check_guidance_mode("joint", "joint")
    check_guidance_mode("additive", "per_batch_attribute")
    check_guidance_mode("joint", "independent")
    check_guidance_mode("additive", "independent")
    with pytest.raises(ValueError, match="invalid for a model trained"):
        check_guidance_mode("additive", "joint")
    with pytest.raises(ValueError, match="invalid for a model trained"):
        cfg_velocity(model, batch[2], [1.0, 1.0], VOCAB, "joint", "per_batch_attribute")
    with pytest.raises(ValueError):
        cfg_velocity(model, batch[2], [1.0], VOCAB, "joint", "joint")


@torch.no_grad()
def test_cfg_interpolation_endpoints(model, batch) -> None:
    x, t, labels = batch
    other = torch.tensor([[1, 0], [0, 1], [2, 0], [1, 2]])
    v1, v2 = model(x, t, labels), model(x, t, other)
    for alpha, want in ((0.0, v1), (1.0, v2)):
        got = cfg_interpolation_velocity(model, labels, other, alpha)(x, t)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    mid = cfg_interpolation_velocity(model, labels, other, 0.25)(x, t)
    torch.testing.assert_close(mid, 0.75 * v1 + 0.25 * v2, atol=1e-5, rtol=1e-5)


# Toy problem: data = mixture of N(mu_k, s^2 I) in 2-D; the exact velocity and the exact noisy
# classifier p(k | x_t) are both closed form.
MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
PRIOR = torch.tensor([0.5, 0.5], dtype=torch.float64)
S = 0.4


def _parts(x, t):
    xf = x.reshape(x.shape[0], -1).double()
    tt = t.double()[:, None, None]
    var = tt**2 * S**2 + (1 - tt) ** 2
    diff = xf[:, None] - tt * MEANS[None]  # (B, K, 2)
    logits = PRIOR.log()[None] - 0.5 * (diff**2).sum(-1) / var[..., 0]  # (B, K)
    return tt, var, diff, logits


def toy_velocity(x, t):
    tt, var, diff, logits = _parts(x, t)
    u = MEANS[None] + (tt * S**2 - (1 - tt)) * diff / var
    return (torch.softmax(logits, 1)[..., None] * u).sum(1).reshape(x.shape).to(x.dtype)


def toy_classifier(x, t):
    return _parts(x, t)[3].to(x.dtype)  # exact log p(k | x_t) up to a constant


def test_guidance_factor_window_and_clip() -> None:
    f = guidance_factor(torch.tensor([0.01, 0.04, 0.05, 0.5, 0.9]), t_min=0.05, max_factor=5.0)
    torch.testing.assert_close(f, torch.tensor([0.0, 0.0, 5.0, 1.0, 0.1 / 0.9]))


def test_classifier_guided_velocity_formula() -> None:
    x = torch.randn(6, 1, 2, generator=torch.Generator().manual_seed(2))
    t = torch.full((6,), 0.25)
    y = torch.zeros(6, dtype=torch.long)
    guided = classifier_guided_velocity(toy_velocity, [ClassifierTerm(toy_classifier, y, 2.0)])
    xr = x.clone().requires_grad_(True)
    logp = torch.log_softmax(toy_classifier(xr, t), 1)[:, 0].sum()
    (grad,) = torch.autograd.grad(logp, xr)
    want = toy_velocity(x, t) + 2.0 * (0.75 / 0.25) * grad
    torch.testing.assert_close(guided(x, t), want)
    early = torch.full((6,), 0.01)  # below t_min: plain velocity
    torch.testing.assert_close(guided(x, early), toy_velocity(x, early))


def test_classifier_guidance_moves_samples_to_target_class() -> None:
    x0 = torch.randn(1000, 1, 2, generator=torch.Generator().manual_seed(3))
    plain = sample_heun(toy_velocity, x0, num_steps=30).x
    target = torch.zeros(1000, dtype=torch.long)  # class 0 = left mode
    term = ClassifierTerm(toy_classifier, target, 2.0)
    guided = sample_heun(classifier_guided_velocity(toy_velocity, [term]), x0, num_steps=30)
    frac_plain = (plain[:, 0, 0] < 0).float().mean().item()
    frac_guided = (guided.x[:, 0, 0] < 0).float().mean().item()
    assert abs(frac_plain - 0.5) < 0.06
    assert frac_guided > 0.9
    assert guided.nfe == 60


def test_classifier_interpolation_endpoints() -> None:
    x = torch.randn(5, 1, 2, generator=torch.Generator().manual_seed(4))
    t = torch.full((5,), 0.6)
    y1, y2 = torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long)
    for alpha, y in ((0.0, y1), (1.0, y2)):
        terms = interpolation_terms(toy_classifier, y1, y2, alpha, scale=3.0)
        got = classifier_guided_velocity(toy_velocity, terms)(x, t)
        want = classifier_guided_velocity(toy_velocity, [ClassifierTerm(toy_classifier, y, 3.0)])
        torch.testing.assert_close(got, want(x, t))


def test_noised_start_is_on_the_path() -> None:
    z = torch.randn(3, 2, 2)
    x = noised_start(z, 0.1, torch.Generator().manual_seed(5))
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(x, 0.1 * z + 0.9 * eps)

"""Skip-connected MLP denoiser and noisy-latent classifier (scDiffusion features)."""

from __future__ import annotations

import pytest
import torch

from atlasldm.models.classifier import ClassifierConfig, NoisyLatentClassifier, classifier_loss
from atlasldm.models.flow import flow_loss, sample_euler, velocity_from_model
from atlasldm.models.guidance import ClassifierTerm, cfg_velocity, classifier_guided_velocity
from atlasldm.models.skip_mlp import SkipMLP, SkipMLPConfig


def tiny_skip(**overrides) -> SkipMLP:
    base = dict(num_latent_tokens=2, latent_dim=3, hidden_dims=[24, 16, 8], head_dim=20)
    base.update(overrides)
    return SkipMLP(SkipMLPConfig(**base))


def test_skip_mlp_default_layout_matches_scdiffusion() -> None:
    model = SkipMLP(SkipMLPConfig(num_latent_tokens=16, latent_dim=16))
    down = [(m.fc.in_features, m.fc.out_features) for m in model.down]
    up = [(m.fc.in_features, m.fc.out_features) for m in model.up]
    assert down == [(256, 2000), (2000, 1000), (1000, 500)]
    assert up == [(500, 1000), (1000, 2000)]
    assert [m.emb[1].in_features for m in model.up] == [2000, 2000]  # time width = first width
    assert (model.head[0].out_features, model.head[-1].out_features) == (2000, 256)
    assert model.t_embedder.freq_dim == 2000
    norms = [m.norm for m in (*model.down, *model.up)]
    assert len({id(n) for n in norms}) == len(norms)  # separate norms (scDiffusion shares)


def test_skip_mlp_forward_zero_init_and_conditioning() -> None:
    torch.manual_seed(0)
    model = tiny_skip(vocab_sizes=[3])
    x, t = torch.randn(5, 2, 3), torch.rand(5)
    labels = torch.tensor([[0], [1], [2], [3], [0]])  # 3 = null
    assert torch.equal(model(x, t, labels), torch.zeros_like(x))  # zero output init
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)
    v_cond, v_null = model(x, t, labels), model(x, t, None)
    assert v_cond.shape == x.shape
    torch.testing.assert_close(v_cond[3], v_null[3])  # null code == no condition
    assert not torch.allclose(v_cond[0], v_null[0])


def test_skip_connections_carry_the_down_path() -> None:
    torch.manual_seed(1)
    model = tiny_skip()
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)
    x, t = torch.randn(4, 2, 3), torch.rand(4)
    base = model(x, t)
    with torch.no_grad():  # cut the bottleneck: the output must still depend on x via skips
        for layer in model.up:
            layer.fc.weight.zero_()
    cut = model(x, t)
    assert not torch.allclose(cut, base)
    assert not torch.allclose(cut, model(x + 1.0, t))


def test_skip_mlp_is_a_drop_in_backbone_for_flow_and_cfg() -> None:
    torch.manual_seed(2)
    model = tiny_skip(vocab_sizes=[2], cfg_dropout_scheme="joint")
    z = torch.randn(64, 2, 3) * 0.3 + 1.0
    labels = torch.randint(2, (64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(15):
        g = torch.Generator().manual_seed(step)
        loss = flow_loss(model, z, model.drop_labels(labels, g), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    v = cfg_velocity(model, labels, [1.5], [2], "joint", scheme="joint")
    res = sample_euler(v, torch.randn(64, 2, 3), num_steps=8)
    assert res.x.shape == (64, 2, 3) and res.nfe == 8 and torch.isfinite(res.x).all()
    res = sample_euler(velocity_from_model(model, labels), torch.randn(64, 2, 3), num_steps=3)
    assert res.nfe == 3


def tiny_classifier() -> NoisyLatentClassifier:
    cfg = ClassifierConfig(
        num_latent_tokens=1, latent_dim=2, num_classes=2, hidden_dims=[32, 16, 8], time_freq_dim=16
    )
    return NoisyLatentClassifier(cfg)


def two_clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(2, (n,), generator=g)
    centre = torch.stack([y * 4.0 - 2.0, torch.zeros(n)], 1)  # (n, 2): x = -2 or +2
    return (centre + 0.4 * torch.randn(n, 2, generator=g)).reshape(n, 1, 2), y


def test_classifier_layout_and_null_labels_ignored() -> None:
    model = NoisyLatentClassifier(
        ClassifierConfig(num_latent_tokens=16, latent_dim=16, num_classes=7)
    )
    widths = [(m.fc.in_features, m.fc.out_features) for m in model.layers]
    assert widths == [(256, 1000), (1000, 500), (500, 200)]
    assert model.out.out_features == 7
    logits = model(torch.randn(3, 16, 16), torch.rand(3))
    assert logits.shape == (3, 7)
    small = tiny_classifier()
    z, _ = two_clusters(8, 0)
    loss, metrics = classifier_loss(small, z, torch.full((8,), 2), torch.Generator())
    assert loss.item() == 0.0 and metrics["accuracy"].item() == 0.0  # all null: no signal
    with pytest.raises(ValueError):
        ClassifierConfig(num_classes=1)


def test_trained_classifier_learns_and_guides_sampling() -> None:
    torch.manual_seed(3)
    clf = tiny_classifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-2)
    for step in range(30):
        z, y = two_clusters(128, step)
        loss, _ = classifier_loss(clf, z, y, torch.Generator().manual_seed(10_000 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    z, y = two_clusters(512, 999)
    with torch.no_grad():
        acc = (clf(z, torch.full((512,), 0.95)).argmax(-1) == y).float().mean().item()
    assert acc > 0.95

    def still(x, t):  # zero velocity: any drift towards the class comes from the classifier
        return torch.zeros_like(x)

    target = torch.ones(200, dtype=torch.long)  # class 1 = right cluster (x > 0)
    x0 = torch.randn(200, 1, 2, generator=torch.Generator().manual_seed(4))
    clf.eval()
    guided = sample_euler(
        classifier_guided_velocity(still, [ClassifierTerm(clf, target, 2.0)]), x0, 10
    ).x
    before = (x0[:, 0, 0] > 0).float().mean().item()
    after = (guided[:, 0, 0] > 0).float().mean().item()
    assert after > before + 0.2

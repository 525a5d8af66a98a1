"""DiT: adaLN-Zero identity at init, reference parameter count, conditioning and dropout, bf16."""

from __future__ import annotations

import pytest
import torch

from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.embeddings import drop_conditions, null_labels
from atlasldm.models.flow import flow_loss

VOCAB = [3, 2]


def small_config(**overrides) -> DiTConfig:
    base = dict(
        num_latent_tokens=4,
        latent_dim=6,
        embed_dim=32,
        num_layers=2,
        num_heads=4,
        vocab_sizes=list(VOCAB),
    )
    base.update(overrides)
    return DiTConfig(**base)


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Move every trainable weight off its (zero) init so outputs depend on all inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(cfg: DiTConfig, batch: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.num_latent_tokens, cfg.latent_dim, generator=g)
    t = torch.rand(batch, generator=g)
    cols = [torch.randint(v, (batch,), generator=g) for v in cfg.vocab_sizes]
    labels = torch.stack(cols, 1) if cols else torch.zeros(batch, 0, dtype=torch.long)
    return x, t, labels


def test_blocks_are_identity_and_output_is_zero_at_init() -> None:
    torch.manual_seed(0)
    cfg = small_config()
    model = DiT(cfg)
    x, t, labels = inputs(cfg)
    c = model.condition(t, labels)
    h = model.input_proj(x) + model.pos_embed
    for block in model.blocks:
        assert torch.equal(block(h, c), h)
    out = model(x, t, labels)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))
    assert model.pos_embed.abs().sum() > 0 and not model.pos_embed.requires_grad


def test_reference_parameter_count() -> None:
    # REF ldm_base: width 256, 8 blocks, 8 heads, one 14-class attribute, 16 tokens x 16 dims.
    model = DiT(DiTConfig(vocab_sizes=[14]))
    assert sum(p.numel() for p in model.parameters()) == 9_745_424


def test_unconditional_dit_builds_runs_and_trains() -> None:
    cfg = small_config(vocab_sizes=[])
    model = perturb(DiT(cfg))
    x, t, _ = inputs(cfg)
    out = model(x, t, None)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert model.input_proj.weight.grad is not None


def test_unconditional_condition_follows_model_device_and_dtype() -> None:
    # With A = 0 the label sum is built from nothing; it must follow .to(...) like the weights
    # (checked through the dtype: CPU-only CI cannot move the model to CUDA).
    model = DiT(small_config(vocab_sizes=[])).to(torch.float64)
    zero = model.cond_embedder(None, 2)
    assert zero.dtype == torch.float64 and zero.shape == (2, 32) and not zero.any()
    assert model.condition(torch.zeros(2), None).dtype == torch.float64


def test_labels_none_means_all_null_and_labels_matter() -> None:
    cfg = small_config()
    model = perturb(DiT(cfg))
    x, t, labels = inputs(cfg)
    null = null_labels(cfg.vocab_sizes, x.shape[0])
    assert torch.equal(model(x, t, None), model(x, t, null))
    assert not torch.allclose(model(x, t, labels), model(x, t, null))
    with pytest.raises(ValueError):
        model(x, t, labels[:, :1])


def test_swap_shift_scale_equals_permuted_modulation() -> None:
    cfg = small_config()
    ref = perturb(DiT(small_config(swap_shift_scale=True)), seed=3)
    ours = DiT(cfg)
    state = ref.state_dict()
    w = cfg.embed_dim
    # Chunks are (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m): swap 0<->1 and 3<->4.
    perm = torch.cat([torch.arange(w) + k * w for k in (1, 0, 2, 4, 3, 5)])
    for i in range(cfg.num_layers):
        for name in ("weight", "bias"):
            key = f"blocks.{i}.adaln_modulation.1.{name}"
            state[key] = state[key][perm]
    ours.load_state_dict(state)
    x, t, labels = inputs(cfg)
    torch.testing.assert_close(ours(x, t, labels), ref(x, t, labels))


def test_condition_dropout_touches_only_labels_and_uses_null_rows() -> None:
    cfg = small_config(cfg_dropout_scheme="independent", cond_drop_prob=0.5)
    model = DiT(cfg)
    _, _, labels = inputs(cfg, batch=64)
    before = labels.clone()
    dropped = model.drop_labels(labels, torch.Generator().manual_seed(0))
    assert torch.equal(labels, before)  # input untouched, a new tensor returned
    vocab = torch.tensor(cfg.vocab_sizes)
    changed = dropped != labels
    assert changed.any()
    assert torch.equal(dropped[changed], vocab.expand_as(labels)[changed])  # null = last code
    for table, v in zip(model.cond_embedder.tables, cfg.vocab_sizes, strict=True):
        assert table.num_embeddings == v + 1  # the null token is the last row
    again = model.drop_labels(labels, torch.Generator().manual_seed(0))
    assert torch.equal(again, dropped)  # same generator seed, same nulls (resume)


@pytest.mark.parametrize("scheme", ["joint", "per_batch_attribute", "independent"])
def test_condition_dropout_schemes_and_rates(scheme: str) -> None:
    vocab, p, n = [4, 3, 5], 0.3, 20_000
    g = torch.Generator().manual_seed(1)
    labels = torch.stack([torch.randint(v, (n,), generator=g) for v in vocab], 1)
    is_null = drop_conditions(labels, vocab, scheme, p, g) == torch.tensor(vocab)  # (n, A)
    if scheme == "joint":
        assert (is_null.all(1) | ~is_null.any(1)).all()  # all attributes together or none
        assert abs(is_null[:, 0].float().mean().item() - p) < 0.015
    elif scheme == "independent":
        rates = is_null.float().mean(0)
        assert (rates - p).abs().max() < 0.015
        both = (is_null[:, 0] & is_null[:, 1]).float().mean().item()
        assert abs(both - p * p) < 0.01  # independent across attributes
    else:
        kept_cols = (~is_null).any(0)
        assert kept_cols.sum() == 1  # one attribute chosen, the others fully null
        chosen = int(kept_cols.nonzero())
        assert abs(is_null[:, chosen].float().mean().item() - p) < 0.015
        null = torch.tensor(vocab)
        picks = [
            int((drop_conditions(labels[:8], vocab, scheme, 0.0, g) != null).any(0).nonzero())
            for _ in range(300)
        ]
        counts = torch.bincount(torch.tensor(picks), minlength=3).float() / 300
        assert (counts - 1 / 3).abs().max() < 0.1  # the chosen attribute is uniform


def test_condition_dropout_rejects_bad_input() -> None:
    labels = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError):
        drop_conditions(labels, [3, 2], "mutually_exclusive", 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        drop_conditions(labels, [3, 2], "joint", 1.5)
    with pytest.raises(ValueError):
        drop_conditions(labels + 5, [3, 2], "joint", 0.1)
    assert drop_conditions(labels[:, :0], [], "joint", 0.5).shape == (4, 0)


def test_bf16_autocast_forward_backward_close_to_fp32() -> None:
    cfg = small_config()
    model = perturb(DiT(cfg), seed=5, std=0.1)
    x, _, labels = inputs(cfg, batch=16)

    def loss_and_grad(autocast: bool) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = flow_loss(model, x, labels, torch.Generator().manual_seed(7))
        loss.backward()
        assert loss.dtype == torch.float32
        return loss.item(), model.input_proj.weight.grad.clone()

    loss32, grad32 = loss_and_grad(False)
    loss16, grad16 = loss_and_grad(True)
    assert torch.isfinite(torch.tensor(loss16)) and torch.isfinite(grad16).all()
    assert abs(loss16 - loss32) / loss32 < 0.02
    cos = torch.nn.functional.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0)
    assert cos > 0.98

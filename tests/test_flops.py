"""Analytic FLOP counts (models/flops.py) against torch's FlopCounterMode on small models.

FlopCounterMode counts the same thing as the formulas (matmuls and attention products as
2·m·n·k), so forward counts must agree to ``FORWARD_RTOL``; the models run with the
``reference`` attention backend because FlopCounterMode does not count CPU SDPA kernels. Each
test also checks that every non-zero analytic term exceeds the tolerance, so a formula that
drops any term fails. Training counts use the 3 x forward convention, which overcounts the few
products whose input needs no gradient (e.g. the DiT's input projection): ``TRAIN_RTOL``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from atlasldm.models import flops
from atlasldm.models.batch import CellBatch
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.vae import VAE, VAEConfig

FORWARD_RTOL = 1e-4  # analytic vs counted forward FLOPs (exact up to float rounding)
TRAIN_RTOL = 0.02  # analytic 3 x forward (+ recompute) vs counted forward + backward


def _small_vae(count_embedding: str, posterior: str) -> VAEConfig:
    return VAEConfig(
        num_genes=64,
        embed_dim=16,
        num_layers=1,
        num_heads=4,
        num_cross_heads=2,
        num_latent_tokens=8,
        latent_dim=8,
        count_embedding=count_embedding,
        posterior=posterior,
        decode_chunk=24,  # several chunks, the last one partial
        attention_backend="reference",
    )


def _batch(cells: int, genes: int, vocab: int, seed: int = 0) -> CellBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randperm(vocab, generator=g)[:genes] + 1 for _ in range(cells)])
    counts = torch.randint(1, 10, (cells * genes,), generator=g).float()
    cu = torch.arange(cells + 1, dtype=torch.int32) * genes  # (B+1,) equal lengths
    return CellBatch.from_packed(ids, counts, cu)


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _assert_matches(analytic: flops.FlopCount, cells: int, counted: int, rtol: float) -> None:
    total = analytic.total(cells)
    assert total == pytest.approx(counted, rel=rtol), (total, counted)
    terms = {k: v for k, v in analytic.terms(cells).items() if v > 0}
    too_small = {k: v / counted for k, v in terms.items() if v <= 2 * rtol * counted}
    assert not too_small, (
        f"terms below the tolerance, dropping them would go unnoticed: {too_small}"
    )


@pytest.mark.parametrize(
    ("count_embedding", "posterior"),
    [("log1p_mul", "deterministic"), ("projconcat", "gaussian"), ("softbin", "deterministic")],
)
def test_vae_forward_flops_match_flop_counter(count_embedding: str, posterior: str) -> None:
    torch.manual_seed(0)
    cfg = _small_vae(count_embedding, posterior)
    vae = VAE(cfg).eval()  # eval: no checkpoint recompute; grad mode on for the module tracker
    B, S = 3, 20
    batch = _batch(B, S, cfg.num_genes)
    counted = _counted(lambda: vae.loss(batch))
    _assert_matches(flops.vae_forward_flops(cfg, S, cfg.num_genes), B, counted, FORWARD_RTOL)


def test_vae_train_flops_include_checkpoint_recompute() -> None:
    torch.manual_seed(0)
    cfg = _small_vae("log1p_mul", "deterministic")
    cfg.checkpoint_decode = "true"  # "auto" would not checkpoint a decode this small
    vae = VAE(cfg).train()
    B, S = 2, 16
    batch = _batch(B, S, cfg.num_genes)
    counted = _counted(lambda: vae.loss(batch).total.backward())
    analytic = flops.vae_train_flops(cfg, S, cfg.num_genes, recompute=True)
    assert analytic.total(B) == pytest.approx(counted, rel=TRAIN_RTOL)
    without = flops.vae_train_flops(cfg, S, cfg.num_genes, recompute=False).total(B)
    assert abs(without - counted) > TRAIN_RTOL * counted  # the recompute term is needed


def test_dit_flops_match_flop_counter() -> None:
    torch.manual_seed(0)
    cfg = DiTConfig(embed_dim=32, num_layers=2, num_heads=4, time_freq_dim=32, vocab_sizes=[5])
    cfg.attention_backend = "reference"
    dit = DiT(cfg)
    B = 4
    x = torch.randn(B, cfg.num_latent_tokens, cfg.latent_dim)
    t, labels = torch.rand(B), torch.randint(0, 5, (B, 1))
    counted = _counted(lambda: dit(x, t, labels))
    _assert_matches(flops.dit_forward_flops(cfg), B, counted, FORWARD_RTOL)
    counted_train = _counted(lambda: dit(x, t, labels).square().sum().backward())
    assert flops.dit_train_flops(cfg).total(B) == pytest.approx(counted_train, rel=TRAIN_RTOL)


def test_linear_form_and_census_scale_estimate() -> None:
    cfg = VAEConfig(num_genes=36130, embed_dim=512, num_heads=8, num_cross_heads=8)
    S, G = 2000, 36130
    form = flops.vae_linear_form(cfg, flops.TRAIN_FACTOR)
    direct = flops.vae_train_flops(cfg, S, G)
    assert form["per_S"] * S + form["per_G"] * G + form["const"] == pytest.approx(
        direct.cell_total(), rel=1e-12
    )
    assert form["step_per_G"] * G + form["step_const"] == pytest.approx(
        sum(direct.per_step.values()), rel=1e-12
    )
    # docs/model.md, "Numerics and memory": ≈ 9E² multiply-adds per (cell, gene);
    # ≈ 0.51 TFLOP per cell at E = 512.
    assert form["per_G"] / flops.TRAIN_FACTOR == pytest.approx(18 * 512**2, rel=0.05)
    assert direct.cell_total() == pytest.approx(0.51e12, rel=0.05)


def test_swiglu_hidden_matches_layers() -> None:
    from atlasldm.models.layers import swiglu_hidden_dim

    for dim in (16, 32, 100, 256, 512, 1024):
        assert flops.swiglu_hidden(dim, 4) == swiglu_hidden_dim(dim, 4)


def test_bench_presets_and_overrides() -> None:
    from atlasldm.bench.model_presets import build_configs

    overrides = ["vae.latent_dim=8", "dit.embed_dim=128", "bench.dec_genes=100,200"]
    vae, dit, bench = build_configs("census70m", [*overrides, "vae.checkpoint_decode=false"], True)
    assert (vae.num_genes, vae.embed_dim, vae.num_heads) == (36130, 512, 8)
    assert vae.latent_dim == dit.latent_dim == 8  # the DiT's token width follows the VAE
    assert dit.embed_dim == 128 and bench.dec_genes == [100, 200] and bench.steps <= 2
    assert vae.checkpoint_decode == "false"
    for bad in ("vae.nope=1", "model.embed_dim=4", "vae.embed_dim"):
        with pytest.raises(ValueError):
            build_configs("reference", [bad], False)

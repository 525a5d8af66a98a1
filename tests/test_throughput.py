"""Model FLOPs of a micro-batch and MFU, the formulas behind perf/model_tflops and perf/mfu."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from atlasldm.models.flops import TRAIN_FACTOR, vae_train_flops
from atlasldm.models.skip_mlp import SkipMLP, SkipMLPConfig
from atlasldm.models.vae import VAEConfig
from atlasldm.train.throughput import (
    denoiser_flops_fn,
    peak_tflops,
    throughput_metrics,
    vae_flops_fn,
)


def test_skip_mlp_flops_are_three_forwards_of_torchs_count() -> None:
    cfg = SkipMLPConfig(num_latent_tokens=4, latent_dim=8, hidden_dims=[64, 32, 16], head_dim=48)
    net = SkipMLP(cfg)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.randn(5, 4, 8), torch.rand(5), None)
    flops = denoiser_flops_fn(cfg)(SimpleNamespace(num_cells=5))
    assert flops == TRAIN_FACTOR * counter.get_total_flops()


def test_vae_batch_flops_sum_the_per_cell_counts() -> None:
    cfg = VAEConfig(
        num_genes=50,
        embed_dim=16,
        num_layers=1,
        num_heads=2,
        num_cross_heads=2,
        num_latent_tokens=4,
        latent_dim=8,
    )
    lengths = [3, 17, 9]
    batch = SimpleNamespace(num_tokens=sum(lengths), num_cells=len(lengths))
    per_cell = sum(vae_train_flops(cfg, s, 50).cell_total() for s in lengths)
    per_step = sum(vae_train_flops(cfg, 0, 50).per_step.values())
    assert vae_flops_fn(cfg)(batch) == pytest.approx(per_cell + per_step, rel=1e-12)


def test_mfu_needs_a_known_peak() -> None:
    cpu = torch.device("cpu")
    assert peak_tflops(cpu, "bf16") is None
    assert peak_tflops(cpu, "bf16", override=2.0) == 2.0
    no_peak = throughput_metrics(3e12, 1.5, world=2, peak=None)
    assert no_peak == {"perf/model_tflops": pytest.approx(2.0)}
    out = throughput_metrics(3e12, 1.5, world=2, peak=4.0)
    assert out["perf/mfu"] == pytest.approx(2.0 / 8.0)  # all ranks' FLOPs over all ranks' peak


@pytest.mark.parametrize("normaliser", ["estimated", "exact"])
def test_sampled_decode_flops_match_torchs_count_of_the_step(normaliser) -> None:
    """Padded expressed rows + k sampled rows trained (+ every gene forward for "exact")."""
    from atlasldm.models.batch import CellBatch
    from atlasldm.models.vae import VAE

    shape = {"embed_dim": 16, "num_layers": 1, "num_heads": 2, "num_cross_heads": 2}
    cfg = VAEConfig(num_genes=60, num_latent_tokens=4, latent_dim=8, **shape)
    cfg.sampled_zeros, cfg.sampled_normaliser = 10, normaliser
    cfg.attention_backend = "reference"  # matmuls the counter sees, as in tests/test_flops.py
    lengths = [3, 17, 9]
    cu = torch.tensor([0, 3, 20, 29], dtype=torch.int32)
    ids = torch.cat([torch.randperm(60)[:n] + 1 for n in lengths])
    torch.manual_seed(0)
    vae = VAE(cfg).train()
    batch = CellBatch.from_packed(ids, torch.ones(29), cu)
    with FlopCounterMode(display=False) as counter:
        vae.loss(batch, generator=torch.Generator().manual_seed(0)).total.backward()
    host = SimpleNamespace(num_tokens=29, num_cells=3, cu_seqlens=cu)
    assert vae_flops_fn(cfg)(host) == pytest.approx(counter.get_total_flops(), rel=0.05)

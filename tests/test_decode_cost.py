"""checkpoint_decode=auto: the activation estimate, the decision, and equal results either way."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from atlasldm.models.batch import CellBatch
from atlasldm.models.decode_cost import decode_activation_bytes, normalise_switch
from atlasldm.models.vae import VAE, VAEConfig
from atlasldm.train.config import load_config
from atlasldm.train.vae_stage import VAEStageConfig


def saved_bytes_per_row(cfg: VAEConfig, half: bool, cells: int = 4, genes: int = 512) -> float:
    """Bytes autograd keeps for one chunk of the gene-query block and the NB likelihood."""
    torch.manual_seed(0)
    vae = VAE(cfg).train()
    k, v = (t.detach().requires_grad_() for t in vae.decoder.context(torch.randn(cells, 16, 16)))
    ids = torch.arange(1, genes + 1)
    seen: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= cells * genes:  # per-row tensors only; weights are not activations
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=half)
    with autocast, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logits = vae.gene_logits(k, v, ids)
        x = torch.randint(0, 3, (cells, genes)).float()
        lse = logits.logsumexp(-1)
        vae.decoder_head.log_prob(x, logits, lse, torch.full((cells,), 1e3), ids).sum()
    return sum(seen.values()) / (cells * genes)


@pytest.mark.parametrize("embed_dim", [32, 128])
@pytest.mark.parametrize("half", [False, True])
def test_the_estimate_is_within_25_percent_of_what_autograd_saves(embed_dim, half):
    cfg = VAEConfig(num_genes=600, embed_dim=embed_dim, num_layers=1, num_cross_heads=4)
    measured = saved_bytes_per_row(cfg, half)
    estimate = decode_activation_bytes(embed_dim, 4, cfg.multiple_of, 1, half)
    assert 0.75 < estimate / measured < 1.25, (estimate, measured)


def test_auto_checkpoints_only_above_the_budget():
    cfg = VAEConfig(num_genes=2000)  # the reference model: ~2.3 kB per row in fp32
    vae, cpu = VAE(cfg).train(), torch.device("cpu")
    assert not vae.checkpoints_decode(64 * 2000, cpu)  # ~0.3 GB
    assert vae.checkpoints_decode(128 * 17002, cpu)  # ~4.9 GB
    small = VAE(dataclasses.replace(cfg, decode_memory_mb=100)).train()
    assert small.checkpoints_decode(64 * 2000, cpu)
    never = VAE(dataclasses.replace(cfg, checkpoint_decode="false")).train()
    assert not never.checkpoints_decode(10**9, cpu)
    assert not vae.eval().checkpoints_decode(10**9, cpu)  # no backward: nothing to keep


def test_checkpointed_and_kept_decodes_give_identical_gradients():
    """Recomputation reproduces the same values: gradients equal bit for bit."""
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randperm(300, generator=g)[:n] + 1 for n in (40, 7, 90)])
    counts = torch.randint(1, 9, (137,), generator=g).float()
    batch = CellBatch.from_packed(ids, counts, torch.tensor([0, 40, 47, 137]))
    grads = {}
    for switch in ("true", "false", "auto"):
        torch.manual_seed(0)
        cfg = VAEConfig(num_genes=300, num_layers=1, decode_chunk=64, checkpoint_decode=switch)
        vae = VAE(cfg).train()
        vae.loss(batch).total.backward()
        grads[switch] = [p.grad.clone() for p in vae.parameters() if p.grad is not None]
    for a, b, c in zip(grads["true"], grads["false"], grads["auto"], strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, "true"), (False, "false"), ("auto", "auto"), ("False", "false"), ("TRUE", "true")],
)
def test_switch_values_from_python_and_yaml(value, expected, tmp_path):
    assert normalise_switch(value) == expected
    assert VAEConfig(num_genes=5, checkpoint_decode=value).checkpoint_decode == expected
    path = tmp_path / "vae.yaml"
    path.write_text(f"model: {{checkpoint_decode: {str(value).lower()}}}\n")
    assert load_config(VAEStageConfig, [path]).model.checkpoint_decode == expected


def test_a_bad_switch_names_the_choices():
    with pytest.raises(ValueError, match="checkpoint_decode auto|true|false"):
        VAEConfig(num_genes=5, checkpoint_decode="sometimes")

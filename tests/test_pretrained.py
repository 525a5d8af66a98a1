"""Exports load with `models.pretrained` alone and reproduce the live model's outputs."""

from dataclasses import asdict

import pytest
import torch

from atlasldm.models.batch import CellBatch
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.pretrained import ExportError, load_denoiser, load_vae
from atlasldm.models.vae import VAE, VAEConfig
from atlasldm.train.export import write_export

V = 40


def _batch() -> CellBatch:
    g = torch.Generator().manual_seed(0)
    lens = (5, 11, 3)
    ids = torch.cat([torch.randperm(V, generator=g)[:n] + 1 for n in lens])
    counts = torch.randint(1, 30, (sum(lens),), generator=g).float()
    cu = torch.tensor([0, 5, 16, 19], dtype=torch.int32)
    return CellBatch.from_packed(ids, counts, cu, library_size=None)


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised layers cannot hide a failed load."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_vae_export_reload_equals_live_model(tmp_path) -> None:
    cfg = VAEConfig(num_genes=V, embed_dim=16, num_layers=1, num_heads=2, num_cross_heads=2,
                    num_inducing_points=4, latent_dim=8)  # fmt: skip
    live = _trained_like(VAE(cfg))
    write_export(tmp_path / "vae", live.state_dict(), asdict(cfg), {"genes.tsv": "token\n"})
    loaded = load_vae(tmp_path / "vae")
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(loaded.encode(batch), live.encode(batch))
        assert torch.equal(loaded.loss(batch).total, live.loss(batch).total)


def test_denoiser_export_reload_equals_live_model(tmp_path) -> None:
    cfg = DiTConfig(latent_tokens=4, latent_dim=8, hidden_dim=32, num_layers=2, num_heads=2,
                    vocab_sizes=[3])  # fmt: skip
    live = _trained_like(DiT(cfg))
    write_export(tmp_path / "dit", live.state_dict(), {"denoiser": "dit", **asdict(cfg)})
    loaded = load_denoiser(tmp_path / "dit")
    x, t = torch.randn(5, 4, 8), torch.rand(5)
    labels = torch.tensor([[0], [1], [2], [3], [1]])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, labels), live(x, t, labels))


def test_truncated_weights_are_refused(tmp_path) -> None:
    cfg = VAEConfig(num_genes=V, embed_dim=16, num_layers=1, num_heads=2, num_cross_heads=2,
                    num_inducing_points=4, latent_dim=8)  # fmt: skip
    folder = write_export(tmp_path / "vae", VAE(cfg).state_dict(), asdict(cfg))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ExportError, match="wrong size"):
        load_vae(folder)

"""Exports load with `models.pretrained` alone and reproduce the live model's outputs; exports
written before a config field was renamed, or before config.json named the model type, still
load; `save_pretrained` / `from_pretrained` round-trip every model class exactly."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from atlasldm.models.batch import CellBatch
from atlasldm.models.classifier import ClassifierConfig, NoisyLatentClassifier
from atlasldm.models.config_names import DeprecatedNameWarning, deprecated_names
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.pretrained import (
    FORMAT_VERSION,
    ExportError,
    load_classifier,
    load_denoiser,
    load_model,
    load_vae,
    model_type,
)
from atlasldm.models.skip_mlp import SkipMLP, SkipMLPConfig
from atlasldm.models.vae import VAE, VAEConfig
from atlasldm.train.export import write_export

V = 40
SMALL_VAE = VAEConfig(
    V, embed_dim=16, num_layers=1, num_heads=2, num_cross_heads=2, num_latent_tokens=4, latent_dim=8
)


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
    cfg = SMALL_VAE
    live = _trained_like(VAE(cfg))
    write_export(tmp_path / "vae", live.state_dict(), asdict(cfg), {"genes.tsv": "token\n"})
    loaded = load_vae(tmp_path / "vae")
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(loaded.encode(batch), live.encode(batch))
        assert torch.equal(loaded.loss(batch).total, live.loss(batch).total)


def test_denoiser_export_reload_equals_live_model(tmp_path) -> None:
    cfg = DiTConfig(
        num_latent_tokens=4, latent_dim=8, embed_dim=32, num_layers=2, num_heads=2, vocab_sizes=[3]
    )
    live = _trained_like(DiT(cfg))
    write_export(tmp_path / "dit", live.state_dict(), {"denoiser": "dit", **asdict(cfg)})
    loaded = load_denoiser(tmp_path / "dit")
    x, t = torch.randn(5, 4, 8), torch.rand(5)
    labels = torch.tensor([[0], [1], [2], [3], [1]])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, labels), live(x, t, labels))


def test_truncated_weights_are_refused(tmp_path) -> None:
    cfg = SMALL_VAE
    folder = write_export(tmp_path / "vae", VAE(cfg).state_dict(), asdict(cfg))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ExportError, match="wrong size"):
        load_vae(folder)


def _old_names(cls: type, config: dict) -> dict:
    """`config` as an export written before the renames spelt it (new name -> old name)."""
    old_of = {new: old for old, new in deprecated_names(cls).items()}
    return {old_of.get(k, k): v for k, v in config.items()}


OLD_DIT = DiTConfig(
    num_latent_tokens=4,
    latent_dim=8,
    embed_dim=32,
    num_layers=1,
    num_heads=2,
    time_freq_dim=16,
    attention_backend="reference",
    vocab_sizes=[3],
)
OLD_SKIP_MLP = SkipMLPConfig(num_latent_tokens=4, latent_dim=8, hidden_dims=[16, 8], head_dim=8)
OLD_CLASSIFIER = ClassifierConfig(
    num_latent_tokens=4, latent_dim=8, hidden_dims=[16, 8], time_freq_dim=8
)
# kind: (model class, config with every renamed field set, loader, extra config.json keys)
OLD_EXPORTS = {
    "vae": (VAE, SMALL_VAE, load_vae, {}),
    "dit": (DiT, OLD_DIT, load_denoiser, {"denoiser": "dit"}),
    "skip_mlp": (SkipMLP, OLD_SKIP_MLP, load_denoiser, {"denoiser": "skip_mlp"}),
    "classifier": (NoisyLatentClassifier, OLD_CLASSIFIER, load_classifier, {}),
}


@pytest.mark.parametrize("kind", sorted(OLD_EXPORTS))
def test_export_with_old_config_names_loads_the_same_model(tmp_path, kind) -> None:
    model_cls, cfg, load, extra = OLD_EXPORTS[kind]
    live = _trained_like(model_cls(cfg))
    old = _old_names(type(cfg), asdict(cfg))
    assert old != asdict(cfg)  # the export really uses old names
    write_export(tmp_path / "old", live.state_dict(), {**extra, **old})
    write_export(tmp_path / "new", live.state_dict(), {**extra, **asdict(cfg)})
    with pytest.warns(DeprecatedNameWarning, match="config.json") as caught:
        from_old = load(tmp_path / "old")
    renamed = [w for w in caught if w.category is DeprecatedNameWarning]
    assert len(renamed) == len(set(old) - set(asdict(cfg)))  # one warning per old key
    from_new = load(tmp_path / "new")
    assert from_old.config == from_new.config == cfg
    a, b = from_old.state_dict(), from_new.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_with_old_and_new_name_is_refused(tmp_path) -> None:
    cfg = OLD_DIT
    config = {"denoiser": "dit", **asdict(cfg), "hidden_dim": cfg.embed_dim}
    folder = write_export(tmp_path / "dit", DiT(cfg).state_dict(), config)
    with pytest.raises(ExportError, match="hidden_dim.*embed_dim"):
        load_denoiser(folder)


# model_type: (class, a small config) for save_pretrained / from_pretrained
SMALL = {
    "vae": (VAE, SMALL_VAE),
    "dit": (DiT, OLD_DIT),
    "skip_mlp": (SkipMLP, OLD_SKIP_MLP),
    "classifier": (NoisyLatentClassifier, OLD_CLASSIFIER),
}


LOADERS = {"vae": load_vae, "dit": load_denoiser, "skip_mlp": load_denoiser}
LOADERS["classifier"] = load_classifier


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_save_pretrained_from_pretrained_round_trip_is_exact(tmp_path, kind) -> None:
    model_cls, cfg = SMALL[kind]
    live = _trained_like(model_cls(cfg))
    folder = live.save_pretrained(tmp_path / kind)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == kind and config["format_version"] == FORMAT_VERSION
    assert model_type(folder) == kind
    loaded = model_cls.from_pretrained(folder)
    assert type(loaded) is model_cls and loaded.config == cfg and not loaded.training
    a, b = live.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert type(load_model(folder)) is model_cls


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_from_pretrained_refuses_another_model_type(tmp_path, kind) -> None:
    model_cls, cfg = SMALL[kind]
    folder = model_cls(cfg).save_pretrained(tmp_path / kind)
    for other, (other_cls, _) in SMALL.items():
        if other != kind:
            with pytest.raises(ExportError, match=f"is a {kind} export, not a {other} export"):
                other_cls.from_pretrained(folder)


def _as_format_1(folder: Path) -> Path:
    """Rewrite an export as format 1 wrote it: no model_type / format_version in config.json."""
    config = json.loads((folder / "config.json").read_text())
    config.pop("model_type"), config.pop("format_version")
    (folder / "config.json").write_text(json.dumps(config))
    manifest = json.loads((folder / "export.json").read_text())
    manifest["format_version"] = 1
    manifest["files"] = {
        p.name: p.stat().st_size for p in folder.iterdir() if p.name != "export.json"
    }
    (folder / "export.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_format_1_exports_without_model_type_keep_loading(tmp_path, kind) -> None:
    model_cls, cfg = SMALL[kind]
    live = _trained_like(model_cls(cfg))
    folder = _as_format_1(live.save_pretrained(tmp_path / kind))
    assert "model_type" not in json.loads((folder / "config.json").read_text())
    assert model_type(folder) == kind  # told from the keys, as the loaders always did
    loaded = LOADERS[kind](folder)
    a, b = live.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_that_is_no_model_export_is_named(tmp_path) -> None:
    folder = write_export(tmp_path / "toy", {"w": torch.ones(2)}, {"kind": "toy"})
    with pytest.raises(ExportError, match="names no model type"):
        model_type(folder)
    with pytest.raises(ExportError, match="does not exist"):
        model_type(tmp_path / "nope")

"""Export folders: round trip, interrupted writes, clear errors for missing/corrupt exports;
exports that travel: model type, model card, permissions, the VAE by relative path and digest,
code version without git, and loading with torch, safetensors and json alone."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import asdict, replace
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.pretrained import export_digest, referenced_vae
from atlasldm.models.vae import VAE, VAEConfig
from atlasldm.train import export
from atlasldm.train.export import (
    CARD,
    CONFIG,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    ExportError,
    provenance_json,
    read_export,
    write_export,
)

REPO = Path(__file__).resolve().parents[1]


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(3, 4, generator=gen), "layer.bias": torch.zeros(3)}


def test_round_trip_and_replace(tmp_path):
    folder = tmp_path / "export"
    extra = {"genes.tsv": "token\tfeature_id\n1\tENSG0001\n", "blob.bin": b"\x00\x01"}
    write_export(folder, _state(), {"latent_dim": 16}, extra)
    state, config, where = read_export(folder)
    assert where == folder and config == {"latent_dim": 16}
    for key, value in _state().items():
        assert torch.equal(state[key], value) and state[key].dtype == torch.float32
    assert (folder / "genes.tsv").read_text().endswith("ENSG0001\n")
    assert (folder / "blob.bin").read_bytes() == b"\x00\x01"
    write_export(folder, {"w": torch.ones(2)}, {"latent_dim": 8})  # replaces the old export
    state, config, _ = read_export(folder)
    assert list(state) == ["w"] and config == {"latent_dim": 8}
    assert not (folder / "genes.tsv").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no tmp/old folders left


def test_interrupted_write_leaves_no_valid_export(tmp_path):
    folder = tmp_path / "export"
    with pytest.raises(TypeError):  # a non-serialisable config fails after the weights are written
        write_export(folder, _state(), {"bad": object()})
    assert not folder.exists()
    assert list(tmp_path.iterdir()) == []
    write_export(folder, _state(), {"ok": 1})
    with pytest.raises(TypeError):  # a failed re-export keeps the previous good export
        write_export(folder, _state(), {"bad": object()})
    assert read_export(folder)[1] == {"ok": 1}


def test_missing_incomplete_and_corrupt_exports_give_clear_errors(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        read_export(tmp_path / "nope")
    folder = tmp_path / "export"
    write_export(folder, _state(), {})
    (folder / MANIFEST).unlink()
    with pytest.raises(ExportError, match=r"no export\.json.*interrupted"):
        read_export(folder)
    write_export(folder, _state(), {})
    with open(folder / WEIGHTS, "ab") as fh:
        fh.write(b"junk")
    with pytest.raises(ExportError, match=r"model\.safetensors.*wrong size"):
        read_export(folder)
    write_export(folder, _state(), {})
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / WEIGHTS).write_bytes(b"x" * manifest["files"][WEIGHTS])
    with pytest.raises(ExportError, match="cannot be read"):
        read_export(folder)
    with pytest.raises(ExportError, match="extra file names"):
        write_export(folder, _state(), {}, {"config.json": "{}"})


def _vae_export(folder: Path, source: Path | None = None) -> Path:
    """A VAE export as the VAE stage writes it (config, genes, labels, provenance)."""
    cfg = VAEConfig(10, embed_dim=8, num_layers=1, num_heads=2, num_cross_heads=2)
    cfg = replace(cfg, num_latent_tokens=2, latent_dim=4)
    info = {"step": 40, "cells_seen": 1280, "val": {"val/nll": 12.5, "val/pearson": 0.25}}
    prov = provenance_json("vae", info, data_source=str(source), data_fingerprint="f" * 8)
    genes = "token\tfeature_id\tfeature_name\n" + "".join(f"{i}\tE{i}\tG{i}\n" for i in range(10))
    extra = {"genes.tsv": genes, "labels.json": json.dumps({"cell_type": ["B", "T"]})}
    return write_export(
        folder, VAE(cfg).state_dict(), asdict(cfg), {**extra, "provenance.json": prov}
    )


def _dit_export(folder: Path, vae: Path) -> Path:
    cfg = DiTConfig(num_latent_tokens=2, latent_dim=4, embed_dim=16, num_layers=1, num_heads=2)
    cfg = replace(cfg, time_freq_dim=8, vocab_sizes=[2])
    fields = {"vae_export": str(vae), "vae_export_digest": export_digest(vae)}
    prov = provenance_json("dit", {"step": 7, "val": {}}, denoiser="dit", **fields)
    config = {"denoiser": "dit", **asdict(cfg)}
    return write_export(folder, DiT(cfg).state_dict(), config, {"provenance.json": prov})


def test_config_names_the_model_type_and_format(tmp_path) -> None:
    vae = _vae_export(tmp_path / "vae")
    dit = _dit_export(tmp_path / "dit", vae)
    for folder, kind in ((vae, "vae"), (dit, "dit")):
        raw = json.loads((folder / CONFIG).read_text())
        assert raw["model_type"] == kind and raw["format_version"] == FORMAT_VERSION
        _, config, _ = read_export(folder)  # the model fields only, as before
        assert "model_type" not in config and "format_version" not in config
    toy = write_export(tmp_path / "toy", _state(), {"kind": "toy"})  # no model: no type
    assert "model_type" not in json.loads((toy / CONFIG).read_text())


def test_files_are_world_readable_whatever_the_umask(tmp_path) -> None:
    old = os.umask(0o077)  # a cluster's private default: new files 0600, folders 0700
    try:
        folder = _vae_export(tmp_path / "vae")
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_the_dit_export_names_its_vae_by_relative_path_and_digest(tmp_path) -> None:
    runs = tmp_path / "runs"
    vae = _vae_export(runs / "vae" / "export")
    dit = _dit_export(runs / "dit" / "export", vae)
    recorded = json.loads((dit / "provenance.json").read_text())
    assert recorded["vae_export"] == os.path.join("..", "..", "vae", "export")
    assert recorded["vae_export_digest"] == export_digest(vae)
    moved = tmp_path / "elsewhere" / "runs"
    shutil.copytree(runs, moved)  # the tree travels: the reference still resolves
    assert referenced_vae(moved / "dit" / "export") == moved / "vae" / "export"
    _vae_export(moved / "vae" / "export", source=tmp_path)  # re-exported: another digest
    with pytest.raises(ExportError) as caught:
        referenced_vae(moved / "dit" / "export")
    message = str(caught.value)
    assert "\n" not in message and "pass the VAE export it was trained on" in message
    assert str(moved / "dit" / "export") in message and str(moved / "vae" / "export") in message


def test_model_card_describes_data_training_use_and_loading(tmp_path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    manifest = {"n_cells": 700, "n_genes": 10, "obs_filter": "is_primary_data == True",
                "source": {"kind": "pbmc68k", "source": "builtin:pbmc68k"}}  # fmt: skip
    (copy / "manifest.json").write_text(json.dumps(manifest))
    card = (_vae_export(tmp_path / "vae", source=copy) / CARD).read_text()
    for expected in (
        f"- source: `{copy}` (training copy of `builtin:pbmc68k`)",
        "- cells: 700 in the training copy; 1,280 seen in training",
        "- genes: 10",
        "- filter: `is_primary_data == True`",
        "- conditions: cell_type (2 values)",
        "- steps: 40",
        "| val/nll | 12.5 |",
        "## Intended use",
        'gen = atlasldm.load_pretrained("path/to/this/folder")',
    ):
        assert expected in card, expected
    assert "model.safetensors" in card and "config.json" in card  # loading without atlasldm


def test_code_version_without_git_is_the_package_version(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(export, "REPO_ROOT", tmp_path)  # an installed wheel: no .git beside it
    assert export.code_version() == f"atlasldm=={version('atlasldm')}"
    monkeypatch.setattr(export, "REPO_ROOT", REPO)
    monkeypatch.setenv("PATH", str(tmp_path))  # a checkout, but no git executable
    assert export.code_version() == f"atlasldm=={version('atlasldm')}"


def _git_repo(folder: Path) -> str:
    """A one-commit git repository in `folder`; returns its commit."""
    folder.mkdir()
    git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (folder / "f").write_text(folder.name)
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
    return head.stdout.strip()


def test_code_version_is_the_package_checkout_not_the_working_directory(monkeypatch, tmp_path):
    package, other = _git_repo(tmp_path / "package"), _git_repo(tmp_path / "other")
    monkeypatch.setattr(export, "REPO_ROOT", tmp_path / "package")
    monkeypatch.chdir(tmp_path / "other")  # the user's own repository
    assert package != other and export.code_version() == package
    (tmp_path / "package" / "f").write_text("edited")
    assert export.code_version() == package + "+dirty"


LOAD_WITHOUT_ATLASLDM = """
import json, os, sys
import torch
from safetensors.torch import load_file

dit = sys.argv[1]
config = json.load(open(os.path.join(dit, "config.json")))
weights = load_file(os.path.join(dit, "model.safetensors"))
vae_ref = json.load(open(os.path.join(dit, "provenance.json")))["vae_export"]
vae = os.path.normpath(os.path.join(dit, vae_ref))
vae_config = json.load(open(os.path.join(vae, "config.json")))
assert not any(m == "atlasldm" or m.startswith("atlasldm.") for m in sys.modules)
print(json.dumps({
    "model_type": config["model_type"], "vae_model_type": vae_config["model_type"],
    "vae": vae, "sums": {k: float(v.double().sum()) for k, v in weights.items()},
    "dtypes": sorted({str(v.dtype) for v in weights.values()}),
}))
"""


def test_an_export_loads_with_torch_safetensors_and_json_only(tmp_path) -> None:
    vae = _vae_export(tmp_path / "vae")
    dit = _dit_export(tmp_path / "dit", vae)
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_ATLASLDM, str(dit)],
        cwd=tmp_path,  # away from the repository: nothing of it on the path
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["model_type"] == "dit" and seen["vae_model_type"] == "vae"
    assert Path(seen["vae"]) == vae and seen["dtypes"] == ["torch.float32"]
    state, _, _ = read_export(dit)
    assert seen["sums"] == {k: float(v.double().sum()) for k, v in state.items()}

"""Export folders: round trip, interrupted writes, clear errors for missing/corrupt exports."""

from __future__ import annotations

import json

import pytest
import torch

from atlasldm.train.export import MANIFEST, WEIGHTS, ExportError, read_export, write_export


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

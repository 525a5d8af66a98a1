"""Shared fixtures: small training copies built once per test session in a temporary folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiledbsoma
import torch

from atlasldm.data import soma
from atlasldm.data.ingest import main as ingest_main
from atlasldm.data.materialize import open_copy_manifest
from atlasldm.train.checkpoint import write_latest
from atlasldm.train.export import read_export

SMALL_SYNTHETIC = "synthetic:cells=3000,genes=300,datasets=5,cell_types=6,seed=0"


def build_copy(out: Path, source: str, *extra: str) -> Path:
    """Run the ingest command in-process and return the copy folder."""
    argv = ["--source", source, "--out", str(out), "--log-level", "WARNING", *extra]
    assert ingest_main(argv) == 0
    return out


@pytest.fixture(scope="session")
def pbmc_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training copy of builtin:pbmc68k (700 cells x 765 genes, seed 0)."""
    return build_copy(tmp_path_factory.mktemp("pbmc") / "copy", "builtin:pbmc68k")


@pytest.fixture(scope="session")
def small_synthetic_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training copy of 3,000 synthetic cells x 300 genes, 5 dataset_id blocks, seed 0.

    Condition columns: cell_type, dataset_id. Written in 1,024-cell blocks (3 X fragments).
    """
    out = tmp_path_factory.mktemp("synthetic") / "copy"
    return build_copy(out, SMALL_SYNTHETIC, "--block-cells", "1024")


def read_training_copy(out: Path) -> tuple:
    """(X CSR, obs DataFrame, var DataFrame, side arrays dict, manifest) of a training copy."""
    manifest = open_copy_manifest(out)
    with tiledbsoma.Experiment.open(str(Path(out) / "experiment")) as exp:
        n, g = manifest["n_cells"], manifest["n_genes"]
        X = soma.read_csr(exp.ms["RNA"].X["raw"], np.arange(n), np.arange(g))
        obs = exp.obs.read().concat().to_pandas().sort_values("soma_joinid")
        var = exp.ms["RNA"].var.read().concat().to_pandas().sort_values("soma_joinid")
    side = {p.stem: np.load(p) for p in (Path(out) / "side").glob("*.npy")}
    return X, obs.reset_index(drop=True), var.reset_index(drop=True), side, manifest


@pytest.fixture(scope="session")
def read_copy():
    """The `read_training_copy` function, for tests that inspect copies."""
    return read_training_copy


def fork_training_run(src: Path, dst: Path, step: int) -> Path:
    """Copy run `src` as it was right after its checkpoint at `step` (a run stopped there).

    Later checkpoints, the export and universal conversions are left out, `latest` points at
    `step`, and metric lines of later steps (which the resumed run must make again) are dropped.
    """

    def ignore(folder: str, names: list[str]) -> list[str]:
        late = [n for n in names if n.startswith("step_") and int(n[5:]) > step]
        return late + [n for n in names if n in ("export", "universal")]

    shutil.copytree(src, dst, ignore=ignore)
    write_latest(dst / "checkpoints", f"step_{step:07d}")
    metrics = dst / "metrics.jsonl"
    if metrics.is_file():
        rows = metrics.read_text().splitlines()
        kept = [r for r in rows if json.loads(r)["step"] <= step]
        metrics.write_text("".join(r + "\n" for r in kept))
    return dst


@pytest.fixture(scope="session")
def fork_run():
    """The `fork_training_run` function, for resume tests."""
    return fork_training_run


# A 1-layer VAE that trains in seconds on 2 CPU ranks (launcher overrides for tests).
TINY_VAE = [
    "model.embed_dim=16",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.num_cross_heads=2",
    "model.num_latent_tokens=4",
    "model.latent_dim=4",
]


def assert_same_export(got: Path, ref: Path) -> None:
    """The exported weights of two run folders are equal bit for bit."""
    wa, _, _ = read_export(got / "export")
    wb, _, _ = read_export(ref / "export")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)


def read_run_metrics(run_dir: Path) -> dict[int, dict]:
    """Step -> merged metrics of a run's metrics.jsonl (later lines win, as after a resume)."""
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["step"], {}).update(row)
    return out

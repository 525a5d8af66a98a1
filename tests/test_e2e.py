"""The shortened end-to-end run: every stage runs through its launcher and the table comes out.

`python launchers/e2e.py --quick` trains each stage for a few steps, so the model rows are not a
result; the test checks the plumbing (each generated set matches the held-out cells one to one)
and that the known-bad references order as they must on this split.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest

REPO = Path(__file__).resolve().parent.parent
SETS = ("real_floor", "scldm", "vae_prior", "scdiffusion", "poisson_mean", "gene_shuffled")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("e2e")
    cmd = [sys.executable, str(REPO / "launchers" / "e2e.py"), "--quick", "--root", str(root)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc


def test_table_lists_every_set_and_the_verdict(quick_run) -> None:
    root, proc = quick_run
    for name in SETS:
        assert f"| {name} |" in proc.stdout
    for key in ("w2", "mmd2_u", "c2st_knn_auc"):
        assert f"{key}: scLDM" in proc.stdout
    assert (root / "e2e.md").read_text().strip() in proc.stdout
    for figure in ("pca.png", "genes.png", "trajectory_scldm.png"):
        assert (root / "report" / figure).stat().st_size > 10_000


def test_generated_sets_match_the_held_out_cells(quick_run) -> None:
    root, _ = quick_run
    test = ad.read_h5ad(root / "real_test.h5ad")
    train = ad.read_h5ad(root / "real_train.h5ad")
    assert not set(test.obs["soma_joinid"]) & set(train.obs["soma_joinid"])
    assert test.n_obs + train.n_obs == 700
    for name in ("scldm", "vae_prior", "scdiffusion"):
        gen = ad.read_h5ad(root / "generated" / f"{name}.h5ad")
        assert list(gen.obs["cell_type"].astype(str)) == list(test.obs["cell_type"])
        assert list(gen.obs["library_size"]) == list(test.X.sum(1).A1)
        assert list(gen.var_names) == list(test.var_names)
    traj = ad.read_h5ad(root / "generated" / "scldm_trajectory.h5ad")
    assert sorted(set(traj.obs["interp_alpha"])) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_known_bad_references_order_above_the_floor(quick_run) -> None:
    root, _ = quick_run
    sets = json.loads((root / "report" / "report.json").read_text())["sets"]
    for key in ("w2", "mmd2_u", "energy", "c2st_knn_auc"):
        floor, pois, shuf = (sets[s]["summary"][key]["value"] for s in
                             ("real_floor", "poisson_mean", "gene_shuffled"))  # fmt: skip
        assert floor < pois < shuf, (key, floor, pois, shuf)

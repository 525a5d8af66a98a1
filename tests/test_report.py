"""The CLI writes a full report folder: JSON, markdown with floor and known-bad rows, PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from atlasldm.evaluation.cli import main
from atlasldm.evaluation.context import EvalConfig
from atlasldm.evaluation.figures import write_figures
from atlasldm.evaluation.fixtures import carve_floor
from atlasldm.evaluation.protocol import prepare

CLASSES = ("a", "b", "c")


def _synthetic(n_per_class: int, seed: int, n_genes: int = 40, shift: float = 0.0) -> ad.AnnData:
    """Return NB counts with class-specific mean profiles (a few marker genes per class)."""
    rng = np.random.default_rng(seed)
    base = np.exp(np.random.default_rng(123).uniform(-1, 2, size=n_genes))
    rows, labels = [], []
    for i, c in enumerate(CLASSES):
        mu = base.copy()
        mu[i * 5 : i * 5 + 5] *= 6.0 + shift  # marker genes of class c
        rows.append(rng.negative_binomial(5, 5 / (5 + mu), size=(n_per_class, n_genes)))
        labels += [c] * n_per_class
    obs = pd.DataFrame({"cell_type": labels}, index=[f"c{seed}_{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=[f"ENSG{i:05d}" for i in range(n_genes)])
    return ad.AnnData(np.concatenate(rows).astype(np.float32), obs=obs, var=var)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    _synthetic(30, seed=0).write_h5ad(root / "test.h5ad")
    _synthetic(60, seed=1).write_h5ad(root / "train.h5ad")
    gens = [_synthetic(30, seed=10 + s, shift=20.0) for s in (0, 1)]
    for s, g in enumerate(gens):
        g.obs["seed"] = s
        g.obs["interp_alpha"] = np.round(np.linspace(0, 1, g.n_obs), 1)
    ad.concat(gens).write_h5ad(root / "gen.h5ad")
    argv = ["--real-test", str(root / "test.h5ad"), "--real-train", str(root / "train.h5ad")]
    argv += ["--generated", f"toy={root / 'gen.h5ad'}", "--label-key", "cell_type"]
    argv += ["--out", str(root / "out"), "--seeds", "0", "1", "--n-top-genes", "30"]
    argv += ["--rf-trees", "20", "--known-bad-seeds", "0"]
    return main(argv)


def test_report_folder_has_json_markdown_and_figures(report_dir: Path) -> None:
    names = {p.name for p in report_dir.iterdir()}
    assert {"report.json", "report.md", "pca.png", "genes.png", "trajectory_toy.png"} <= names
    assert all((report_dir / n).stat().st_size > 1000 for n in names if n.endswith(".png"))


def test_report_json_is_strict_and_holds_settings_and_seeds(report_dir: Path) -> None:
    text = (report_dir / "report.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    st = results["settings"]
    assert st["n_hvg"] == 30 and len(st["hvg_genes"]) == 30 and st["inputs"]["n_floor"] == 90
    assert st["label_key"] == "cell_type" and st["known_bad_seeds"] == [0]
    toy = results["sets"]["toy"]
    assert toy["kind"] == "generated" and toy["seeds"] == [0, 1]
    assert toy["summary"]["w2"]["n_seeds"] == 2 and toy["summary"]["w2"]["sem"] is not None
    assert results["sets"]["real_floor"]["kind"] == "floor"


def test_report_markdown_lists_floor_known_bad_and_model_rows(report_dir: Path) -> None:
    md = (report_dir / "report.md").read_text()
    for row in ("| real_floor | floor |", "| poisson_mean | known_bad |", "| gene_shuffled |"):
        assert row in md
    assert "| toy | generated | 2 |" in md
    assert "MMD² (unbiased)" in md and "Block A" in md and "Skipped classes" in md
    assert "## Per class: W2" in md and "| a |" in md
    # The floor row comes before the known-bad rows, which come before the models.
    assert md.index("| real_floor |") < md.index("| poisson_mean |") < md.index("| toy |")


def test_shifted_generated_set_scores_worse_than_the_floor(report_dir: Path) -> None:
    sets = json.loads((report_dir / "report.json").read_text())["sets"]
    # W2 in 30 PCs at 90 cells per side is dominated by sampling noise; the fixed-n kernel
    # and energy statistics are the ones that resolve a shift this small.
    for key in ("mmd2_u", "energy", "c2st_knn_auc"):
        vals = {n: r["summary"][key]["value"] for n, r in sets.items()}
        assert vals["real_floor"] < vals["toy"], key


@pytest.mark.slow
def test_umap_figure_is_written(tmp_path: Path) -> None:
    # umap-learn compiles with numba on its first use, which is slow: hence the slow tier.
    test, train = _synthetic(30, seed=0), _synthetic(60, seed=1)
    floor, ref = carve_floor(train.obs["cell_type"], test.obs["cell_type"])
    config = EvalConfig(n_top_genes=30, known_bad_seeds=(0,), block_a=False)
    ctx, sets = prepare(train[ref].copy(), test, train[floor].copy(), {}, config)
    written = write_figures(ctx, sets, tmp_path, umap=True)
    assert tmp_path / "umap.png" in written and (tmp_path / "umap.png").stat().st_size > 1000

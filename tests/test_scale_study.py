"""The synthetic scale study: its truth is nested and its fresh cells are new, and it runs.

The study compares corpora of several sizes against fresh cells of the same generator, so two
properties of data/synthetic.py carry it: a smaller corpus is a prefix of a larger one (for whole
generator blocks), and blocks past the largest corpus are new draws from the same per-type
expression. Both are checked on the generator's output, not assumed. The `--quick` study then
runs end to end in a subprocess (ingest, both launchers, generation, one evaluation) and a rerun
reuses every stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from atlasldm.data.synthetic import GEN_BLOCK, _Model, generate_anndata, generate_block, var_frame
from atlasldm.pipeline import scale_report
from atlasldm.pipeline import scale_study as study
from atlasldm.pipeline.stages import recipe_steps

REPO = Path(__file__).resolve().parent.parent
TRUTH = study.QUICK_TRUTH


def _profiles(cells) -> dict[str, np.ndarray]:
    """Log mean expression fraction of each gene, per cell type."""
    X = cells.X.toarray()
    X = X / X.sum(axis=1, keepdims=True)
    types = cells.obs["cell_type"].astype(str).to_numpy()
    return {t: np.log(X[types == t].mean(axis=0) + 1e-3) for t in np.unique(types)}


def test_a_smaller_corpus_is_a_prefix_of_a_larger_one_for_whole_blocks() -> None:
    small, large = study.spec_of(TRUTH, 1500), study.spec_of(TRUTH, 5000)
    study.check_same_truth([small, large])
    X_s, obs_s = generate_block(small, 0, _Model(small))
    X_l, obs_l = generate_block(large, 0, _Model(large))
    assert (X_s != X_l).nnz == 0
    assert obs_s.equals(obs_l)
    # The last, partial block of the smaller corpus is another draw: its length changes its draws.
    X_s, obs_s = generate_block(small, 1, _Model(small))
    X_l, _ = generate_block(large, 1, _Model(large))
    assert X_s.shape[0] == 1500 - GEN_BLOCK
    assert (X_s != X_l[: X_s.shape[0]]).nnz > 0


def test_corpora_of_several_datasets_are_not_nested_and_are_refused() -> None:
    specs = [study.spec_of(TRUTH.replace("datasets=1", "datasets=3"), n) for n in (1500, 5000)]
    with pytest.raises(ValueError, match="ds_start"):
        study.check_same_truth(specs)
    with pytest.raises(ValueError, match="more than `cells`"):
        study.check_same_truth([study.spec_of(TRUTH, 1500), study.spec_of("genes=100", 1500)])


def test_fresh_truth_is_new_cells_with_the_training_cells_per_type_means() -> None:
    spec = study.spec_of(TRUTH, 1500)
    train = generate_anndata(spec)
    genes = list(var_frame(spec).index)
    fresh = study.fresh_truth(TRUTH, (600, 1500), {"a": 600, "b": 400}, genes)
    first = study.first_fresh_block((600, 1500)) * GEN_BLOCK
    ids = [int(name.removeprefix("cell_")) for a in fresh.values() for name in a.obs_names]
    assert min(ids) >= first == 2 * GEN_BLOCK and len(set(ids)) == len(ids)
    assert fresh["a"].n_obs + fresh["b"].n_obs >= 998  # at most a rare empty cell left out
    assert list(fresh["a"].var_names) == genes
    # New draws: the first fresh cells are not the first training cells again.
    n = 300
    assert (fresh["a"].X[:n] != train.X[:n]).nnz > 0.5 * train.X[:n].nnz
    # ... of the same truth: per-type mean expression agrees; another seed's truth does not.
    other = study.fresh_truth(TRUTH.replace("seed=0", "seed=1"), (1500,), {"a": 1000}, genes)
    ours, theirs, same = _profiles(train), _profiles(other["a"]), _profiles(fresh["a"])
    for t in ours:
        assert np.corrcoef(ours[t], same[t])[0, 1] > 0.93, t
        assert np.corrcoef(ours[t], theirs[t])[0, 1] < 0.5, t


def _report(values: dict[str, dict[str, float]]) -> dict:
    sets = {
        name: {"summary": {k: {"value": v, "sem": None} for k, v in row.items()}}
        for name, row in values.items()
    }
    return {"sets": sets}


def test_gap_is_signed_towards_worse_and_shrinks_only_when_its_size_falls() -> None:
    keys = [k for k, _, _ in scale_report.METRICS]
    floor = dict.fromkeys(keys, 0.5)
    small = {**floor, "c2st_knn_auc": 0.9, "recall": 0.2, "precision": 0.7}
    large = {**floor, "c2st_knn_auc": 0.6, "recall": 0.4, "precision": 0.2}
    summary = scale_report.summarize(
        _report({"real_floor": floor, "scldm_10": small, "scldm_20": large}), (10, 20)
    )
    gaps = [{k: r["metrics"][k]["gap"] for k in keys} for r in summary["rows"]]
    assert gaps[0]["c2st_knn_auc"] == pytest.approx(0.4)  # lower is better: value - floor
    assert gaps[0]["recall"] == pytest.approx(0.3)  # higher is better: floor - value
    assert gaps[0]["precision"] == pytest.approx(-0.2)  # past the floor: negative
    shrinks = summary["gap_shrinks"]
    assert shrinks["c2st_knn_auc"] and shrinks["recall"]
    assert not shrinks["precision"] and not shrinks["w2"]  # |gap| grew; no gap at all
    assert "DOES NOT shrink" in "\n".join(scale_report.verdict(summary))


def test_epoch_budget_scales_steps_with_the_corpus_and_keeps_the_largest() -> None:
    args = study.parse_args(["--sizes", "5000,20000,50000", "--budget", "epochs"])
    args.vae_steps, args.dit_steps = 1500, 2500
    plan = study.Plan.of(args, Path("/tmp/x"))
    assert [plan.steps("vae", n) for n in plan.sizes] == [150, 600, 1500]
    assert [plan.steps("dit", n) for n in plan.sizes] == [250, 1000, 2500]
    # Each size's launcher gets its own override, so the epochs match across sizes.
    for n in plan.sizes:
        epochs = plan.steps("dit", n) / n
        assert epochs == pytest.approx(2500 / 50000)
        assert plan.step_override("dit", n) == plan.steps("dit", n)
    # The recipe's steps are the largest size's when no steps are given.
    plan = study.Plan.of(study.parse_args(["--sizes", "100,400", "--budget", "epochs"]), Path("."))
    recipe = int(recipe_steps(study.CONFIGS / "vae.yaml"))
    assert plan.steps("vae", 400) == recipe and plan.steps("vae", 100) == round(recipe / 4)
    same = study.Plan.of(study.parse_args(["--sizes", "100,400"]), Path("."))
    assert same.steps("vae", 100) == same.steps("vae", 400) == recipe
    assert same.step_override("vae", 100) is None  # compute-matched: the recipe applies


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("scale") / "study"
    cmd = [sys.executable, str(REPO / "launchers" / "scale_study.py"), "--quick"]
    cmd += ["--root", str(root)]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc


def test_quick_study_scores_every_size_in_one_report(quick_study) -> None:
    root, proc = quick_study
    result = json.loads((root / "scale_study.json").read_text())
    sizes = list(study.QUICK_SIZES)
    assert result["sizes"] == sizes and [r["cells"] for r in result["rows"]] == sizes
    keys = [k for k, _, _ in scale_report.METRICS]
    assert sorted(result["floor"]) == sorted(keys)
    assert 0.3 < result["floor"]["c2st_knn_auc"] < 0.7  # truth against truth
    for row in result["rows"]:
        for k in keys:
            m = row["metrics"][k]
            worse = m["value"] - result["floor"][k]  # lower is better ...
            if k in ("recall", "precision", "cond_accuracy"):  # ... unless higher is
                worse = -worse
            assert m["gap"] == pytest.approx(worse)
    report = json.loads((root / "report" / "report.json").read_text())
    assert sorted(report["sets"]) == sorted(
        ["real_floor", "poisson_mean", "gene_shuffled", *(f"scldm_{n}" for n in sizes)]
    )
    assert report["settings"]["n_test"] == study.QUICK_FRESH["test"]
    text = (root / "scale_study.md").read_text()
    assert text.strip() in proc.stdout
    assert all(f"| scLDM, {n:,} cells |" in text for n in sizes)
    for n in sizes:  # each stage went through its launcher and showed its progress
        assert not result["parts"][f"train vae {n}"]["reused"]
        assert result["parts"][f"train dit {n}"]["wall_s"] > 0
    steps = study.QUICK_STEPS
    per_size = {str(n): steps for n in sizes}
    assert result["budget"] == "steps" and result["steps"] == {"vae": per_size, "dit": per_size}
    for n in sizes:  # the last losses of both stages, read back from their metrics
        losses = result["losses"][str(n)]
        assert set(losses["vae"]) == {"train/nll", "val/nll"}
        assert set(losses["dit"]) == {"train/loss", "val/flow_loss_ema"}
    assert proc.stderr.count(f"train vae: {steps}/{steps} steps (100%)") == len(sizes)


def test_a_rerun_reuses_every_finished_stage(quick_study) -> None:
    root, first = quick_study
    cmd = [sys.executable, str(REPO / "launchers" / "scale_study.py"), "--quick"]
    before = json.loads((root / "scale_study.json").read_text())
    proc = subprocess.run(
        [*cmd, "--root", str(root)], capture_output=True, text=True, timeout=300, check=True
    )
    result = json.loads((root / "scale_study.json").read_text())
    assert list(result["parts"]) == list(before["parts"])  # every part, evaluate included
    assert all(part["reused"] for part in result["parts"].values())
    wall = [part["wall_s"] for part in result["parts"].values()]
    assert wall == [part["wall_s"] for part in before["parts"].values()]  # kept in the markers
    assert result["parts_s"] == pytest.approx(before["parts_s"]) and result["launch_s"] < 30
    assert proc.stdout.count("), reused") == len(result["parts"])
    rows = [[line for line in p.stdout.splitlines() if line.startswith("|")] for p in (proc, first)]
    n = len(study.QUICK_SIZES)
    assert rows[0] == rows[1] and len(rows[0]) == (2 + 1 + n) + (2 + n)  # scores, losses

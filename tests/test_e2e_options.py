"""The end-to-end run's options: --set, the --full profile, and the validation hold-out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from atlasldm.pipeline.e2e import corpus, split_cells
from atlasldm.pipeline.e2e_options import (
    CONFIGS,
    STAGES,
    OptionError,
    Options,
    dotlist,
    load_profile,
    merge,
    parse_args,
    parse_set,
    resolve,
)
from atlasldm.pipeline.stages import Timer


def test_set_overrides_nest_and_merge_over_the_profile() -> None:
    profile = {"dit": {"run": {"max_steps": 3000, "eval_every": 500}}}
    extra = parse_set("dit.run.max_steps=4000")
    assert extra == {"dit": {"run": {"max_steps": 4000}}}
    merged = merge(profile, extra)
    assert merged == {"dit": {"run": {"max_steps": 4000, "eval_every": 500}}}
    assert profile["dit"]["run"]["max_steps"] == 3000  # the profile itself is left alone
    assert dotlist(merge(merged, parse_set("dit.skip.dims=[4, 2]"))["dit"]) == [
        "run.max_steps=4000",
        "run.eval_every=500",
        "skip.dims=[4, 2]",
    ]
    assert parse_set("generate.scldm.cfg_weight=cell_type=2") == {
        "generate": {"scldm": {"cfg_weight": "cell_type=2"}}
    }


@pytest.mark.parametrize(
    "spec", ["dit", "vea.run.max_steps=3", "dit.=3", "generate.other.steps=3", "run.max_steps=3"]
)
def test_a_bad_set_names_the_problem_and_the_fix(spec) -> None:
    with pytest.raises(OptionError, match="expected TARGET.KEY=VALUE|generate.MODEL needs"):
        parse_set(spec)


def test_the_full_profile_overrides_only_known_stages_and_reaches_the_commands() -> None:
    profile = load_profile(CONFIGS / "full.yaml")
    assert profile and set(profile) <= {*STAGES, "generate"}
    opts = resolve(parse_args(["--full", "--set", "dit.optim.lr=0.002"]))
    assert opts.root.name == "e2e_full" and opts.full
    assert "optim.lr=0.002" in opts.recipe_args("dit")
    for stage in STAGES:
        assert opts.recipe_args(stage)[: len(dotlist(profile.get(stage, {})))] == dotlist(
            profile.get(stage, {})
        )
    scldm = profile.get("generate", {}).get("scldm", {})
    assert {k: v for k, v in opts.generate_options("scldm").items() if k in scldm} == scldm


def test_quick_and_full_exclude_each_other(tmp_path) -> None:
    with pytest.raises(OptionError, match="exclude each other"):
        resolve(parse_args(["--quick", "--full"]))
    cmd = [sys.executable, "-m", "atlasldm.launchers.e2e", "--root", str(tmp_path), "--set", "x"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --set 'x'")
    assert not any(tmp_path.iterdir())  # nothing was written


def test_models_choose_their_stages_and_quick_shortens_sampling() -> None:
    opts = resolve(parse_args(["--quick", "--models", "scldm", "--root", "/tmp/x"]))
    assert opts.stages == ("vae", "dit") and opts.seeds == [0]
    assert opts.generate_options("scldm")["steps"] == 5
    prior = resolve(parse_args(["--models", "vae_prior", "--validation"]))
    assert prior.stages == ("vae",) and prior.root == Path("runs/e2e_val").resolve()


def _rows(path: Path) -> set[bytes]:
    X = ad.read_h5ad(path).X
    return {X[i].toarray().tobytes() for i in range(X.shape[0])}


def test_validation_cells_come_from_the_training_cells_only(tmp_path) -> None:
    timer = Timer()
    full = corpus(Options(root=tmp_path / "test"), timer)
    test, train = split_cells(full, tmp_path / "test")
    val_copy = corpus(Options(root=tmp_path / "val", validation=True), timer)
    val, fit = split_cells(val_copy, tmp_path / "val")
    test_rows, train_rows, val_rows, fit_rows = map(_rows, (test, train, val, fit))
    assert not val_rows & test_rows and not fit_rows & test_rows  # the test cells stay unseen
    assert val_rows | fit_rows == train_rows and not val_rows & fit_rows
    assert 0.2 < len(val_rows) / len(train_rows) < 0.4
    labels = ad.read_h5ad(val).obs["cell_type"].astype(str)
    assert labels.nunique() > 3 and "unknown" not in set(labels)  # labels survive the re-ingest
    assert np.all(ad.read_h5ad(val).X.sum(1) > 0)

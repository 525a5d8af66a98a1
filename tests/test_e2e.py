"""The shortened end-to-end run, from a wheel, in a folder that shadows the generic names.

The package is built as a wheel and installed (not editable) into a fresh venv. From an unrelated
folder that holds its own `train.py` and `models.py` (the most common names in ML projects, which
broke the imports when the project installed top-level `train` and `models` packages), the test
runs `python -m atlasldm.launchers.e2e --quick`: every stage runs through its launcher and the
table comes out. `--quick` trains each stage for a few steps, so the model rows are not a result;
the test checks the plumbing (each generated set matches the held-out cells one to one) and that
the known-bad references order as they must on this split. Uninstalling then leaves the venv's
site-packages as it was before the install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import anndata as ad
import pytest

from atlasldm.pipeline.e2e import QUICK, STAGES, StageWatch

REPO = Path(__file__).resolve().parent.parent
SETS = ("real_floor", "scldm", "vae_prior", "scdiffusion", "poisson_mean", "gene_shuffled")
SHADOW = 'raise SystemExit("the user\'s own {name} was imported instead of atlasldm")\n'


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, " ".join(map(str, cmd)) + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _wheel_venv(tmp: Path) -> tuple[Path, Path]:
    """Build the wheel and make a venv that sees the installed dependencies; return python, site."""
    build = ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist")]
    _run([sys.executable, "-m", "pip", *build, str(REPO)])
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    python = venv / "bin" / "python"
    purelib = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    return python, Path(purelib)


def _user_folder(tmp: Path) -> Path:
    """A folder with its own train.py and models.py, on PYTHONPATH for every process."""
    folder = tmp / "my_project"
    folder.mkdir()
    for name in ("train", "models", "data"):
        (folder / f"{name}.py").write_text(SHADOW.format(name=f"{name}.py"))
    return folder


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("wheel")
    python, site = _wheel_venv(tmp)
    before = sorted(p.name for p in site.iterdir())
    wheel = next((tmp / "dist").glob("atlasldm-*.whl"))
    _run([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", str(wheel)])
    installed = sorted(p.name for p in site.iterdir())
    folder, root = _user_folder(tmp), tmp / "e2e"
    env = {**os.environ, "PYTHONPATH": str(folder), "WANDB_MODE": "offline"}
    probe = "import atlasldm.models.vae as m; print(m.__file__)"
    where = _run([python, "-c", probe], cwd=folder, env=env)
    cmd = [python, "-m", "atlasldm.launchers.e2e", "--quick", "--root", str(root)]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _run([python, "-m", "pip", "uninstall", "-y", "-q", "atlasldm"])
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout  # the wheel, not the repo
    version = wheel.name.split("-")[1]
    assert set(installed) - set(before) == {"atlasldm", f"atlasldm-{version}.dist-info"}
    assert sorted(p.name for p in site.iterdir()) == before, "uninstall left files behind"
    return root, proc


def test_table_lists_every_set_and_the_verdict(quick_run) -> None:
    root, proc = quick_run
    for name in SETS:
        assert f"| {name} |" in proc.stdout
    for key in ("w2", "mmd2_u", "c2st_knn_auc"):
        assert f"{key}: scLDM" in proc.stdout
    # The gap decomposition: one row per stage's set, then what each stage adds.
    decomposition = proc.stdout.split("## Where the gap comes from")[1]
    for name in ("nb_resample", "vae_means", "vae_recon", "scldm", "scldm_genlib"):
        assert f"| {name} |" in decomposition, name
    assert "largest loss: " in decomposition
    assert (root / "e2e.md").read_text().strip() in proc.stdout
    figures = ["pca.png", "genes.png", "mean_variance.png", "trajectory_scldm.png"]
    figures += [f"training_curves_{stage}.png" for stage in STAGES]
    for figure in figures:
        assert (root / "report" / figure).stat().st_size > 10_000, figure


def test_each_stage_shows_its_progress_and_draws_its_curves(quick_run) -> None:
    root, proc = quick_run
    for stage in STAGES:
        steps = QUICK[stage]
        # Off a terminal, Progress ends each stage with a line of the steps it reached.
        assert f"train {stage}: {steps}/{steps} steps (100%)" in proc.stderr, stage
        assert (root / stage / "training_curves.png").stat().st_size > 10_000, stage
    assert "   step 20 | val/" in proc.stdout  # a stage's validation line, echoed from its log
    assert "evaluate: " in proc.stderr and "metric blocks (100%)" in proc.stderr


def test_stage_watch_counts_logged_steps_and_echoes_progress_lines(tmp_path, capsys) -> None:
    run, log = tmp_path / "vae", tmp_path / "vae.log"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    metrics.write_text('{"step": 7}\n')  # an earlier launch's history is not this launch's work
    watch = StageWatch("train vae", log, run, max_steps=10)
    log.write_text(
        "resolved config (1 ranks):\n"
        "step 2 | cells_seen 128 | train/loss 3.5\n"
        "step 2 | val/nll 1.25\n"
        "ingest: 1,000/7,000 cells (14%), 3.0 cells/s, ETA 0:33\n"
        "wandb: Run data is saved locally in /tmp/wandb\n"
    )
    with metrics.open("a") as fh:
        fh.write('{"step": 1}\n{"step": 2}\n{"step": 3, "train/lo')  # step 3 half written
    watch.poll()
    assert watch.step == 2 and watch.progress.done == 2
    with metrics.open("a") as fh:
        fh.write('ss": 1.0}\n')
    watch.close()
    assert watch.step == 3
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "   step 2 | val/nll 1.25",
        "   ingest: 1,000/7,000 cells (14%), 3.0 cells/s, ETA 0:33",
    ]
    assert "train vae: 3/10 steps (30%)" in err


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
    for name in ("nb_resample", "vae_means", "vae_recon", "scldm_genlib"):
        gen = ad.read_h5ad(root / "generated" / f"{name}.h5ad")
        assert list(gen.obs["cell_type"].astype(str)) == list(test.obs["cell_type"]), name
    genlib = ad.read_h5ad(root / "generated" / "scldm_genlib.h5ad").obs["library_size"]
    assert list(genlib) != list(test.X.sum(1).A1)  # drawn from the VAE's statistics
    recon = ad.read_h5ad(root / "generated" / "vae_recon.h5ad")
    assert list(recon.var_names) == list(test.var_names)
    traj = ad.read_h5ad(root / "generated" / "scldm_trajectory.h5ad")
    assert sorted(set(traj.obs["interp_alpha"])) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_known_bad_references_order_above_the_floor(quick_run) -> None:
    root, _ = quick_run
    sets = json.loads((root / "report" / "report.json").read_text())["sets"]
    for key in ("w2", "mmd2_u", "energy", "c2st_knn_auc"):
        floor, pois, shuf = (
            sets[name]["summary"][key]["value"]
            for name in ("real_floor", "poisson_mean", "gene_shuffled")
        )
        assert floor < pois < shuf, (key, floor, pois, shuf)

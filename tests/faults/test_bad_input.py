"""Bad data sources and bad values end in one line naming the problem and the fix, never a
traceback, and never start (or export) a run (issue #11, items 5 and 9)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_VAE

from atlasldm.data.synthetic import SyntheticSpec, write_synthetic_experiment
from atlasldm.train import vae_stage
from atlasldm.train.cli import one_line_errors

REPO = Path(__file__).resolve().parents[2]
DEBUG = str(REPO / "configs" / "debug.yaml")


def _bad_sources(tmp: Path) -> dict[str, tuple[str, str]]:
    """name -> (data.source, a phrase the one-line error must contain)."""
    (tmp / "empty").mkdir()
    (tmp / "no_manifest" / "side").mkdir(parents=True)
    (tmp / "text.txt").write_text("not a copy\n")
    experiment = write_synthetic_experiment(tmp / "soma", SyntheticSpec(cells=50, genes=20))
    return {
        "empty folder": (str(tmp / "empty"), "is an empty folder"),
        "copy without manifest": (str(tmp / "no_manifest"), "manifest.json is missing"),
        "SOMA experiment in copy mode": (str(experiment), "set data.mode=direct"),
        "text file": (str(tmp / "text.txt"), "is a file, not a folder"),
        "missing path": (str(tmp / "missing"), "does not exist"),
    }


def _one_line_exit(argv: list[str], capsys) -> str:
    """Run the VAE launcher's main in this process; return its one line (exit 2, a mistake)."""
    with pytest.raises(SystemExit) as exit_info, one_line_errors():
        vae_stage.main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and message.count("\n") == 1, message
    assert "Traceback" not in message
    return message.strip()


def test_bad_data_sources_give_one_line(tmp_path, capsys):
    for name, (source, phrase) in _bad_sources(tmp_path).items():
        runs = tmp_path / "runs" / name.replace(" ", "_")
        message = _one_line_exit([DEBUG, f"data.source={source}", f"run.root={runs}"], capsys)
        assert phrase in message and source in message, (name, message)
        assert not runs.exists(), f"{name}: a run folder was started"


@pytest.mark.parametrize(
    "override, phrase",
    [
        ("optim.lr=-0.001", "optim.lr = -0.001 must be > 0"),
        ("data.val_fraction=1.5", "val_fraction=1.5 must be in [0, 1)"),
        ("run.max_steps=-3", "run.max_steps = -3 must be >= 1"),
        ("run.eval_every=-1", "run.eval_every = -1 must be >= 0"),
    ],
)
def test_bad_values_give_one_line_and_no_export(tmp_path, override, phrase, capsys):
    message = _one_line_exit([DEBUG, override, f"run.root={tmp_path}"], capsys)
    assert phrase in message
    assert not any(tmp_path.iterdir()), "a run (or an export) was written"


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _our_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """Lines of our own output (DeepSpeed's launcher logs carry a `[...]` or `[rank` prefix)."""
    lines = (proc.stdout + proc.stderr).splitlines()
    return [x for x in lines if x.startswith("error:") or "Traceback" in x]


@pytest.mark.integration
def test_nan_stop_is_one_line_in_a_real_process(tmp_path):
    """A diverging run (lr 1e12) stops at its first NaN step with one line, exit 1."""
    cmd = [
        sys.executable,
        str(REPO / "launchers" / "train_vae.py"),
        DEBUG,
        *TINY_VAE,
        "optim.lr=1e12",
        "optim.warmup_frac=0",
        "loop.max_bad_steps=0",
        "run.max_steps=30",
        "run.eval_every=0",
        "checkpoint.every_steps=0",
        f"run.root={tmp_path}",
    ]
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert _our_lines(proc) == [
        "error: 1 steps had a NaN/inf loss (loop.max_bad_steps = 0); lower optim.lr, use fp32, "
        "or check the data"
    ]


@pytest.mark.integration
def test_bad_source_under_deepspeed_is_one_line_for_all_ranks(tmp_path):
    """Two ranks under the deepspeed launcher: the error is said once, by rank 0."""
    (tmp_path / "empty").mkdir()
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        str(REPO / "launchers" / "train_vae.py"),
        DEBUG,
        f"data.source={tmp_path / 'empty'}",
        f"run.root={tmp_path / 'runs'}",
    ]
    proc = _run(cmd, tmp_path)
    assert proc.returncode != 0
    lines = _our_lines(proc)
    assert len(lines) == 1 and "is an empty folder" in lines[0], lines

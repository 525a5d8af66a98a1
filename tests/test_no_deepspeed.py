"""Generating and evaluating need no DeepSpeed: both commands run where `import deepspeed` fails.

A `sitecustomize` module on PYTHONPATH installs a meta-path finder that refuses `deepspeed` and
every submodule, as in an environment without it. The launchers then run as a user runs them:
`evaluate.py` on the bundled fixture and `generate.py` on small exports written by this process
(which may use DeepSpeed). An import of DeepSpeed anywhere on those paths fails the command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest
from test_generate import CELL_TYPES, EULER_4, write_dit, write_vae

REPO = Path(__file__).resolve().parent.parent
BLOCKER = '''
import sys


class _NoDeepSpeed:
    """A finder that answers every `deepspeed` import as a missing module."""

    def find_spec(self, name, path=None, target=None):
        if name == "deepspeed" or name.startswith("deepspeed."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, _NoDeepSpeed())
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a process that cannot import deepspeed."""
    site = tmp_path_factory.mktemp("no_deepspeed")
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "disabled"}


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)


def test_the_blocker_blocks(env) -> None:
    proc = _run([sys.executable, "-c", "import deepspeed"], env)
    assert proc.returncode == 1 and "No module named 'deepspeed' (blocked)" in proc.stderr


def test_evaluate_runs_without_deepspeed(env, tmp_path) -> None:
    out = tmp_path / "report"
    fast = ["--rf-trees", "5", "--known-bad-seeds", "0", "--no-block-a"]
    launcher = str(REPO / "launchers" / "evaluate.py")
    proc = _run([sys.executable, launcher, "--fixture", "pbmc68k", "--out", str(out), *fast], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "report.json").is_file() and (out / "pca.png").is_file()


def test_generate_runs_without_deepspeed(env, tmp_path) -> None:
    vae = write_vae(tmp_path / "vae")
    dit = write_dit(tmp_path / "dit", vae)
    out = tmp_path / "gen.h5ad"
    launcher = str(REPO / "launchers" / "generate.py")
    request = ["--condition", f"cell_type={CELL_TYPES[0]}", "--n-cells", "4", *EULER_4]
    args = ["--vae", str(vae), "--denoiser", str(dit), *request, "--out", str(out)]
    proc = _run([sys.executable, launcher, *args], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = ad.read_h5ad(out)
    assert cells.n_obs == 4 and set(cells.obs["cell_type"]) == {CELL_TYPES[0]}

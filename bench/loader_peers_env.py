"""The Python >= 3.12 venv that annbatch runs in, created once and cached.

annbatch requires Python >= 3.12; the project runs on 3.11. :func:`annbatch_python` finds a 3.12
or 3.13 interpreter under pyenv (or `$ATLASLDM_PY312`), creates `<cache>/venvs/annbatch-<pins>`
with the pinned packages (:data:`ANNBATCH_PINS`) the first time, and returns the venv's python;
or returns why it cannot (no interpreter, install failed, or creation not allowed), and the
benchmark prints that and goes on without annbatch. A venv counts as ready only once its
install finished (a marker file), so an interrupted install is redone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

# Exact versions (the newest releases when this benchmark was written); zarrs is annbatch's
# recommended codec pipeline for local files (its `zarrs` extra).
ANNBATCH_PINS = (
    "annbatch==0.3.1",
    "zarrs==0.2.3",
    "zarr==3.4.2",
    "anndata==0.13.4",
    "numpy==2.5.5",
    "scipy==1.18.1",
    "pandas==3.1.1",
    "h5py==3.16.0",
)
READY = "atlasldm-ready.txt"  # written after a complete install


def venv_dir(cache: Path) -> Path:
    """The venv folder for the current pins (new pins: a new venv)."""
    key = hashlib.sha1("\n".join(ANNBATCH_PINS).encode()).hexdigest()[:10]
    return Path(cache) / "venvs" / f"annbatch-{key}"


def find_interpreter() -> Path | None:
    """A Python 3.12 or 3.13: `$ATLASLDM_PY312`, else the newest 3.12 (then 3.13) under pyenv."""
    explicit = os.environ.get("ATLASLDM_PY312")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for minor in ("3.12", "3.13"):
        found = sorted(root.glob(f"{minor}.*/bin/python"), key=lambda p: p.parent.parent.name)
        if found:
            return found[-1]
    return None


def _install(base: Path, folder: Path) -> str:
    """Create the venv and install the pins; '' on success, else the reason (folder removed)."""
    steps = (
        [str(base), "-m", "venv", str(folder)],
        [str(folder / "bin" / "python"), "-m", "pip", "install", "-q", *ANNBATCH_PINS],
    )
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            lines = [ln for ln in done.stderr.splitlines() if ln and "WARNING" not in ln]
            return f"{' '.join(cmd[:4])} failed: {lines[-1] if lines else done.returncode}"
    (folder / READY).write_text("\n".join(ANNBATCH_PINS) + "\n")
    return ""


def annbatch_python(cache: Path, create: bool = True) -> tuple[Path | None, str]:
    """(the venv's python, '') when ready, else (None, why annbatch is skipped)."""
    folder = venv_dir(cache)
    python = folder / "bin" / "python"
    if (folder / READY).is_file() and python.is_file():
        return python, ""
    if not create:
        return None, f"no annbatch venv at {folder} (this run may not create one)"
    base = find_interpreter()
    if base is None:
        return None, "no Python 3.12/3.13 under ~/.pyenv/versions (annbatch needs >= 3.12)"
    print(f"creating the annbatch venv {folder} with {base} (once)", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    why = _install(base, folder)
    return (None, why) if why else (python, "")

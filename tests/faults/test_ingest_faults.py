"""Ingest under hostile input, changed input and kills (issue #11, items 9 and 11-14).

The ingest runs as a real process (`launchers/ingest.py`) wherever the promise is about the
command: one line on stderr, exit status 2, input untouched. Kills are real SIGKILLs delivered at
a chosen point of the run: the child installs a Python audit hook (sys.addaudithook) that kills
its own process when the ingest reaches a given file operation (e.g. the spill's removal), so
the point is exact, not a race against a timer, and the ingest code is not modified.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from atlasldm.data.ingest import main as ingest_main
from atlasldm.data.synthetic import generate_anndata, parse_spec
from atlasldm.data.verify import main as verify_main

REPO = Path(__file__).resolve().parents[2]
INGEST = "launchers/ingest.py"
BLOCKS = ("--block-cells", "64")

# Runs a script or module like `python SCRIPT ARGS...`, but SIGKILLs itself at the first audit
# event EVENT whose first argument (a path) contains NEEDLE.
KILL_AT = r"""
import os, runpy, signal, sys
event, needle, target = sys.argv[1:4]
def kill_at(name, args):
    if name == event and args and needle in str(args[0]):
        os.kill(os.getpid(), signal.SIGKILL)
sys.argv = [target, *sys.argv[4:]]
sys.addaudithook(kill_at)
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


def write_h5ad(path: Path, seed: int = 0, edit=None) -> Path:
    """A small raw-count h5ad (200 cells x 24 genes); `edit(adata)` damages it first."""
    spec = parse_spec(f"cells=200,genes=24,datasets=2,cell_types=3,seed={seed}")
    adata = generate_anndata(spec)
    if edit is not None:
        adata = edit(adata)
    adata.write_h5ad(path)
    return path


def ingest_cli(*argv: str, level: str = "ERROR") -> subprocess.CompletedProcess:
    """The ingest command as a user runs it."""
    cmd = [sys.executable, INGEST, "--log-level", level, *argv]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def killed_at(event: str, needle: str, target: str, *argv: str) -> None:
    """Run target with argv and SIGKILL it at the audit event; asserts that it was killed."""
    cmd = [sys.executable, "-c", KILL_AT, event, needle, target, *argv]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, f"not killed at {event} {needle}: {done.stderr}"


def one_line(done: subprocess.CompletedProcess) -> str:
    """The only stderr line of a refused ingest (exit 2, no traceback)."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, lines
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def library_sizes(copy: Path) -> np.ndarray:
    return np.sort(np.load(copy / "side" / "library_size.npy"))


def expected_library(h5ad: Path) -> np.ndarray:
    import anndata as ad

    return np.sort(np.asarray(ad.read_h5ad(h5ad).X.sum(axis=1)).ravel().astype(np.float32))


def leftovers(copy: Path) -> list[str]:
    """Temporary files and folders of the ingest still in a finished copy."""
    found = [p for p in (copy / ".progress" / "spill",) if p.exists()]
    found += list(copy.glob(".rows.tmp*"))
    for folder in (copy, copy / "side", copy / "rows", copy / ".progress"):
        found += [p for p in folder.glob(".*") if p.is_file() and p.name != ".rows.lock"]
    return sorted(str(p.relative_to(copy)) for p in found)


# Item 9: counts that are finite one by one but sum past float32.
def test_library_size_overflow_is_refused(tmp_path) -> None:
    def huge(adata):
        X = adata.X.toarray().astype(np.float32)
        X[3, 0], X[3, 1] = 3e38, 3e38  # each < 3.4e38, their sum is not
        adata.X = sp.csr_matrix(X)
        return adata

    src = write_h5ad(tmp_path / "huge.h5ad", edit=huge)
    before = sha256(src)
    line = one_line(ingest_cli("--source", str(src), "--out", str(tmp_path / "copy"), *BLOCKS))
    assert str(src) in line and "soma_joinid=3" in line and "float32" in line, line
    assert sha256(src) == before and not (tmp_path / "copy" / "manifest.json").exists()


# Item 11: unreadable h5ad inputs.
def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


UNREADABLE = {
    "0 cells": (lambda a: a[:0].copy(), None, "0 cells"),
    "0 genes": (lambda a: a[:, :0].copy(), None, "0 genes"),
    "truncated": (None, _truncate, "not a readable h5ad"),
    "garbage": (None, _garbage, "not a readable h5ad"),
}


@pytest.mark.parametrize("case", UNREADABLE)
def test_unreadable_h5ad_gives_one_line(tmp_path, case, caplog) -> None:
    edit, damage, expected = UNREADABLE[case]
    src = write_h5ad(tmp_path / "in.h5ad", edit=edit)
    if damage is not None:
        damage(src)
    before = sha256(src)
    assert ingest_main(["--source", str(src), "--out", str(tmp_path / "copy"), *BLOCKS]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(src) in errors[0] and expected in errors[0], errors
    assert "\n" not in errors[0] and sha256(src) == before
    assert not (tmp_path / "copy" / "manifest.json").exists()


def test_truncated_h5ad_command_prints_one_line(tmp_path) -> None:
    src = write_h5ad(tmp_path / "in.h5ad")
    _truncate(src)
    line = one_line(ingest_cli("--source", str(src), "--out", str(tmp_path / "copy")))
    assert str(src) in line and "not a readable h5ad" in line


# Item 12: --resume of a finished copy with another source.
def test_resume_finished_copy_with_another_source_is_refused(tmp_path) -> None:
    a, b = write_h5ad(tmp_path / "a.h5ad"), write_h5ad(tmp_path / "b.h5ad", seed=1)
    out = tmp_path / "copy"
    assert ingest_cli("--source", str(a), "--out", str(out), *BLOCKS).returncode == 0
    manifest = sha256(out / "manifest.json")
    line = one_line(ingest_cli("--source", str(b), "--out", str(out), *BLOCKS, "--resume"))
    assert str(a) in line and str(b) in line, line
    assert sha256(out / "manifest.json") == manifest
    same = ingest_cli("--source", str(a), "--out", str(out), *BLOCKS, "--resume")
    assert same.returncode == 0, same.stderr


# Item 13: an input fixed or changed in place is staged again.
def test_input_fixed_after_a_failed_ingest_is_picked_up(tmp_path) -> None:
    def negative(adata):
        X = adata.X.toarray().astype(np.float32)
        X[5, 2] = -4.0
        adata.X = sp.csr_matrix(X)
        return adata

    src, out = write_h5ad(tmp_path / "in.h5ad", edit=negative), tmp_path / "copy"
    assert "negative" in one_line(ingest_cli("--source", str(src), "--out", str(out), *BLOCKS))
    write_h5ad(src)  # fixed in place
    done = ingest_cli("--source", str(src), "--out", str(out), *BLOCKS, "--resume")
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(library_sizes(out), expected_library(src))
    assert verify_main([str(out)]) == 0


def test_input_changed_after_a_kill_is_ingested_from_its_new_content(tmp_path) -> None:
    src, out = write_h5ad(tmp_path / "in.h5ad"), tmp_path / "copy"
    args = ("--source", str(src), "--out", str(out), *BLOCKS)
    killed_at("os.rename", "chunk_000001.vals", INGEST, *args)  # mid-scatter, plan written
    assert (out / ".progress" / "plan.json").is_file()
    old = expected_library(src)
    write_h5ad(src, seed=7)  # same shape, other counts
    done = ingest_cli(*args, "--resume", level="WARNING")
    assert done.returncode == 0, done.stderr
    assert "changed since the interrupted ingest" in done.stderr
    np.testing.assert_array_equal(library_sizes(out), expected_library(src))
    assert not np.array_equal(library_sizes(out), old)


# Item 14: kills leave nothing behind once --resume finishes the copy.
@pytest.fixture(scope="module")
def h5ad_source(tmp_path_factory) -> Path:
    return write_h5ad(tmp_path_factory.mktemp("src") / "in.h5ad")


@pytest.mark.parametrize(
    ("event", "needle", "left"),
    [
        ("shutil.rmtree", "/.progress/spill", ".progress/spill"),  # after manifest.json
        ("os.rename", "/side/.library_size.", "side/.library_size."),  # finalize, mid side/
    ],
)
def test_kill_then_resume_leaves_no_temporaries(h5ad_source, tmp_path, event, needle, left):
    out = tmp_path / "copy"
    args = ("--source", str(h5ad_source), "--out", str(out), *BLOCKS)
    killed_at(event, needle, INGEST, *args)
    assert any(x.startswith(left) for x in leftovers(out)), leftovers(out)  # the kill hit
    done = ingest_cli(*args, "--resume")
    assert done.returncode == 0, done.stderr
    assert leftovers(out) == []
    assert verify_main([str(out)]) == 0


def test_killed_row_store_build_is_removed_on_resume(h5ad_source, tmp_path) -> None:
    out = tmp_path / "copy"
    args = ("--source", str(h5ad_source), "--out", str(out), *BLOCKS)
    assert ingest_cli(*args).returncode == 0
    # Killed between removing the old store and moving the new one in place.
    killed_at("os.rename", "/.rows.tmp", "atlasldm.data.rowstore", str(out), "--rebuild")
    assert [p.name.startswith(".rows.tmp") for p in out.glob(".rows.tmp*")] == [True]
    done = ingest_cli(*args, "--resume")
    assert done.returncode == 0, done.stderr
    assert leftovers(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert "rows/counts.npy" in manifest["files"]
    assert verify_main([str(out)]) == 0

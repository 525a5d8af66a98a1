"""Peers in the loader benchmark: their formats, their runs, and the figures of every run.

Every measured run is a fresh process (annbatch's in its own venv, :mod:`.loader_peers_env`)
that prints one JSON object and saves the dataset codes of its timed batches; this module turns
those into a row: cells/s, nonzeros per CPU-second, peak RSS, time to first batch, and batch
diversity relative to random batches of the same size (:class:`.diversity.RandomEntropy`).
Two-process runs start two ranks at once and add their cells/s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from atlasldm.bench.diversity import RandomEntropy, batch_entropies
from atlasldm.bench.loader_peers_env import annbatch_python
from atlasldm.bench.loader_peers_scdataset import disk_bytes, export_h5ad

ANNBATCH_SCRIPT = Path(__file__).with_name("loader_peers_annbatch.py")
TIMES = "prepare_times.json"  # seconds each format took to write, kept beside the corpus
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def worker_env() -> dict[str, str]:
    """The environment of a measured run: one OpenMP thread, passive waits."""
    return os.environ | WORKER_ENV


def _last_json(done: subprocess.CompletedProcess, cmd: list[str]) -> dict:
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def score(codes_file: str, rand: RandomEntropy) -> float | None:
    """Mean per-batch dataset entropy / that of random batches of the same size (None: no
    timed batch)."""
    with np.load(codes_file) as z:
        labels, sizes = z["labels"].astype(np.int64), z["sizes"]
    if len(sizes) == 0:
        return None
    ents = batch_entropies(labels, sizes, int(labels.max()) + 1)
    return float(np.mean(rand.ratios(ents, sizes)))


def run_one(cmd: list[str], rand: RandomEntropy) -> dict:
    """Run one measured process (`cmd` without `--codes-out`); its figures with diversity."""
    with tempfile.TemporaryDirectory() as tmp:
        codes = str(Path(tmp) / "codes.npz")
        full = [*cmd, "--codes-out", codes]
        done = subprocess.run(full, capture_output=True, text=True, check=False, env=worker_env())
        out = _last_json(done, full)
        out["diversity_vs_random"] = score(codes, rand)
    return out


def run_ranks(cmd: list[str], rand: RandomEntropy, world: int = 2) -> dict:
    """Run `world` ranks of `cmd` at once (`--rank r --world W`); their combined figures."""
    with tempfile.TemporaryDirectory() as tmp:
        procs, cmds = [], []
        for rank in range(world):
            codes = str(Path(tmp) / f"codes{rank}.npz")
            full = [*cmd, "--rank", str(rank), "--world", str(world), "--codes-out", codes]
            cmds.append(full)
            procs.append(
                subprocess.Popen(
                    full,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=worker_env(),
                )
            )
        outs = []
        for proc, full in zip(procs, cmds, strict=True):
            stdout, stderr = proc.communicate()
            outs.append(
                _last_json(subprocess.CompletedProcess(full, proc.returncode, stdout, stderr), full)
            )
        diversity = [score(str(Path(tmp) / f"codes{r}.npz"), rand) for r in range(world)]
    return combine(outs, diversity)


def combine(outs: list[dict], diversity: list[float | None]) -> dict:
    """One row for ranks that ran at once: cells/s added, CPU pooled, the worst RSS and start."""
    nnz, cpu = sum(o["nnz"] for o in outs), sum(o["cpu_seconds"] for o in outs)
    return {
        "processes": len(outs),
        "cells": sum(o["cells"] for o in outs),
        "nnz": nnz,
        "cells_per_s": sum(o["cells_per_s"] for o in outs),
        "cells_per_s_per_process": [o["cells_per_s"] for o in outs],
        "nnz_per_cpu_s": nnz / cpu if cpu > 0 else 0.0,
        "cpu_seconds": cpu,
        "first_batch_s": max(o["first_batch_s"] for o in outs),
        "peak_rss_gb": max(o["peak_rss_gb"] for o in outs),
        "diversity_vs_random": _mean([d for d in diversity if d is not None]),
    }


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _times(folder: Path) -> dict:
    path = folder / TIMES
    return json.loads(path.read_text()) if path.is_file() else {}


def record_time(folder: Path, key: str, seconds: float) -> None:
    """Remember how long writing one format took (read back when the corpus is reused)."""
    times = _times(folder) | {key: seconds}
    (folder / TIMES).write_text(json.dumps(times, indent=1))


def ensure_h5ad(folder: Path, census_uri: str) -> Path:
    """The corpus as a backed-readable h5ad (scDataset's and annbatch's input), written once."""
    out = folder / "census_layout.h5ad"
    if not out.is_file():
        print(f"writing {out} (scDataset's format)", flush=True)
        record_time(folder, "h5ad", export_h5ad(census_uri, out))
    return out


def ensure_annbatch(folder: Path, h5ad: Path, python: Path) -> Path:
    """annbatch's shuffled zarr collection of the h5ad, written once by annbatch's writer."""
    out = folder / "annbatch.zarr"
    if out.is_dir():
        return out
    partial = folder / "annbatch.partial.zarr"
    if partial.exists():  # an interrupted write
        shutil.rmtree(partial)
    print(f"writing {out} with annbatch's DatasetCollection (shuffled)", flush=True)
    cmd = [str(python), str(ANNBATCH_SCRIPT), "prepare", "--h5ad", str(h5ad), "--out", str(partial)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=worker_env())
    _last_json(done, cmd)
    partial.rename(out)
    record_time(folder, "annbatch", time.perf_counter() - t0)
    return out


def prepare_peers(folder: Path, census_uri: str, cache: Path, venv: str) -> dict:
    """Each peer's input: {'h5ad': path, 'annbatch': (python, store) or None, 'skipped': {}}.

    `venv`: "create" (make annbatch's venv when missing), "existing" (use it only when
    present) or "off".
    """
    peers: dict = {"h5ad": ensure_h5ad(folder, census_uri), "annbatch": None, "skipped": {}}
    python, why = (None, "annbatch turned off (--annbatch-venv off)")
    if venv != "off":
        python, why = annbatch_python(cache, create=venv == "create")
    if python is None:
        print(f"annbatch skipped: {why}", flush=True)
        peers["skipped"]["annbatch"] = why
        return peers
    try:
        peers["annbatch"] = (python, ensure_annbatch(folder, peers["h5ad"], python))
    except RuntimeError as err:
        why = f"its writer failed: {str(err).splitlines()[-1]}"
        print(f"annbatch skipped: {why}", flush=True)
        peers["skipped"]["annbatch"] = why
    return peers


def formats_table(folder: Path, census_uri: str, copy: Path, peers: dict) -> dict[str, dict]:
    """Preparation seconds and disk GB of each loader's format, by printed name."""
    times, gb = _times(folder), 1e9
    rows = copy / "rows"
    copy_gb = (disk_bytes(copy) - (disk_bytes(rows) if rows.is_dir() else 0)) / gb
    table = {
        "Census-layout SOMA experiment (source)": (
            times.get("synthetic"),
            disk_bytes(Path(census_uri)) / gb,
        ),
        "atlasldm training copy (ingest, incl. row store)": (times.get("ingest"), copy_gb),
        "atlasldm row store (written by the ingest)": (
            None,
            disk_bytes(rows) / gb if rows.is_dir() else 0.0,
        ),
        "h5ad for scDataset (from the source)": (times.get("h5ad"), disk_bytes(peers["h5ad"]) / gb),
    }
    if peers["annbatch"] is not None:
        store = peers["annbatch"][1]
        table["annbatch zarr collection (from the h5ad)"] = (
            times.get("annbatch"),
            disk_bytes(store) / gb,
        )
    return {k: {"prepare_s": t, "disk_gb": d} for k, (t, d) in table.items()}


def annbatch_cmd(python: Path, store: Path, timing: list[str]) -> list[str]:
    """The command of one annbatch run (`timing`: --seconds/--max-cells/--seed flags)."""
    return [str(python), str(ANNBATCH_SCRIPT), "run", "--store", str(store), *timing]

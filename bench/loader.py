"""Loader benchmark: our CellStream against tiledbsoma-ml's ExperimentDataset on the same data.

Two cases, each timed for both loaders in fresh subprocesses (so peak RSS is per loader):
  (a) a Census-layout experiment (X tiles 2048 x 2048, rows grouped by dataset), our stream in
      direct mode;
  (b) our training copy (rows pre-permuted, cell tile 256, gene tile = all genes).
tiledbsoma-ml runs with shuffle on, `shuffle_chunk_size=64`, its default I/O batch (65,536) and
`return_sparse_X=True` (its fastest path; dense output would add a densify step we don't pay).
Printed per run: cells/s, nonzeros per CPU-second (per core), peak RSS, mean per-batch
`dataset_id` entropy relative to truly random batches, and the ratio to tiledbsoma-ml. The last
line printed is one JSON object with every figure. The measured runs: :mod:`.loader_worker`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from atlasldm.bench.diversity import random_entropy
from atlasldm.bench.loader_worker import BATCH, ML_IO, run_worker

ML_IO_SMALL = 16384  # a tiledbsoma-ml I/O batch whose peak RSS is near our 4 GB budget
DEFAULT_CACHE = Path(os.environ.get("ATLASLDM_CACHE", Path.home() / ".cache" / "atlasldm"))
# Printed name -> JSON key of each tiledbsoma-ml run, in print order.
ML_RUNS = {
    "ml default(dense)": "tiledbsoma_ml_default_dense",
    "ml sparse": "tiledbsoma_ml_sparse",
    f"ml sparse io={ML_IO_SMALL}": "tiledbsoma_ml_sparse_small_io",
}


def spawn(opts: argparse.Namespace, flags: dict[str, Any]) -> dict:
    """Run one worker (`flags`: its options; True = a bare flag) in a fresh process."""
    shared = {"--seconds": opts.seconds, "--max-cells": opts.max_cells, "--threads": opts.threads}
    argv = []
    for key, value in (flags | shared).items():
        argv += [key] if value is True else [key, str(value)]
    cmd = [sys.executable, "-m", "atlasldm.bench.loader", "worker", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_datasets(cache: Path, cells: int, genes: int, datasets: int) -> tuple[str, Path]:
    """Return (Census-layout experiment URI, training copy folder), building what is missing."""
    from atlasldm.data import ingest
    from atlasldm.data.rowstore import build_row_store, has_row_store
    from atlasldm.data.synthetic import write_synthetic_experiment

    name = f"synthetic_{cells}x{genes}_d{datasets}"
    census_uri = write_synthetic_experiment(
        cache / name / "census_layout",
        f"cells={cells},genes={genes},datasets={datasets},cell_types=12,seed=0",
    )
    copy = cache / name / "training_copy"
    if (copy / "manifest.json").is_file() and not has_row_store(copy):
        t0 = time.perf_counter()
        build_row_store(copy)  # copies built before the row store existed
        print(f"row store of {copy}: {time.perf_counter() - t0:.0f} s", flush=True)
    if not (copy / "manifest.json").is_file():
        conditions = ["--conditions", "dataset_id", "cell_type"]
        argv = ["--source", census_uri, "--out", str(copy), *conditions, "--resume"]
        if ingest.main(argv) != 0:
            raise RuntimeError(f"ingest failed: {argv}")
    return census_uri, copy


def _dataset_codes(uri: str) -> np.ndarray:
    import tiledbsoma

    with tiledbsoma.Experiment.open(uri) as exp:
        col = exp.obs.read(column_names=["dataset_id"]).concat()["dataset_id"].to_numpy()
    return np.unique(col.astype(str), return_inverse=True)[1]


def measure_case(opts: argparse.Namespace, uri: str, mode: str, copy: Path) -> dict[str, dict]:
    """Every loader run of one case, by printed name in print order (atlasldm last)."""
    base = {"--uri": uri, "--mode": mode, "--vocab": str(copy / "genes.tsv")}
    base |= {"--io-batch": ML_IO, "--row-store": "auto"}
    ml = base | {"--loader": "ml"}
    dense, sparse, small = ML_RUNS
    runs = {dense: spawn(opts, ml | {"--dense": True}), sparse: spawn(opts, ml)}
    runs[small] = spawn(opts, ml | {"--io-batch": ML_IO_SMALL})
    ours = base | {"--loader": "ours", "--uri": str(copy) if mode == "copy" else uri}
    ours_run = spawn(opts, ours)
    if mode == "copy":  # the same copy read through TileDB instead of its row store
        runs["atlasldm, TileDB read"] = spawn(opts, ours | {"--row-store": "off"})
    runs["atlasldm"] = ours_run
    nnz_per_cell = runs[sparse]["nnz"] / runs[sparse]["cells"]
    d = runs[dense]
    d["nnz_per_cpu_s"] = d["nnz_per_cpu_s"] or nnz_per_cell * d["cells"] / d["cpu_seconds"]
    return runs


def report_case(case: str, runs: dict[str, dict], rand: float) -> dict:
    """Print one case's runs and speed-ups; return its summary entry."""
    for name, r in runs.items():
        r["diversity_vs_random"] = r["entropy"] / rand
        print(
            f"{case:16s} {name:22s} {r['cells_per_s']:8.0f} cells/s "
            f"{r['nnz_per_cpu_s'] / 1e6:6.2f} M nnz/cpu-s  rss {r['peak_rss_gb']:.2f} GB  "
            f"diversity {r['diversity_vs_random']:.3f}",
            flush=True,
        )
    ours = runs["atlasldm"]
    ratios = {name: ours["cells_per_s"] / runs[name]["cells_per_s"] for name in ML_RUNS}
    speedups = ", ".join(f"{v:.2f}x vs {k}" for k, v in ratios.items())
    print(f"{case:16s} atlasldm speed-up: {speedups}", flush=True)
    summary = {key: runs[name] for name, key in ML_RUNS.items()} | {"atlasldm": ours}
    summary["speedup_vs_default_dense"] = ratios["ml default(dense)"]
    summary["speedup_vs_sparse"] = ratios["ml sparse"]
    summary["speedup_vs_sparse_small_io"] = ratios[f"ml sparse io={ML_IO_SMALL}"]
    if "atlasldm, TileDB read" in runs:
        summary["atlasldm_tiledb_read"] = runs["atlasldm, TileDB read"]
    return summary


def run_benchmark(opts: argparse.Namespace) -> dict:
    """Run both cases for both loaders; print a table; return the summary."""
    census_uri, copy = build_datasets(Path(opts.cache), opts.cells, opts.genes, opts.datasets)
    rand = random_entropy(_dataset_codes(census_uri), BATCH)
    cases = {
        "a_census_layout": (census_uri, "direct"),
        "b_training_copy": (str(copy / "experiment"), "copy"),
    }
    summary: dict = {"cells": opts.cells, "genes": opts.genes, "batch": BATCH}
    summary |= {"random_batch_entropy": rand, "cases": {}}
    for case, (uri, mode) in cases.items():
        runs = measure_case(opts, uri, mode, copy)
        summary["cases"][case] = report_case(case, runs, rand)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Options of `launchers/bench_loader.py` (all have defaults: no arguments needed)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=fmt)
    sub = p.add_subparsers(dest="command")
    for name, what in (("run", "run the benchmark (default)"), ("worker", "internal: one run")):
        q = sub.add_parser(
            name, description=__doc__.splitlines()[0], formatter_class=fmt, help=what
        )
        q.add_argument("--seconds", type=float, default=60.0, help="max timed seconds per run")
        q.add_argument("--max-cells", type=int, default=200_000, help="max timed cells per run")
        q.add_argument("--threads", type=int, default=2, help="our reader threads per rank")
    run = sub.choices["run"]
    run.add_argument("--cells", type=int, default=500_000, help="cells of the synthetic set")
    run.add_argument("--genes", type=int, default=20_000, help="genes of the synthetic set")
    run.add_argument("--datasets", type=int, default=30, help="dataset_id blocks of the set")
    run.add_argument(
        "--cache",
        default=str(DEFAULT_CACHE / "bench"),
        help="folder of the generated set and its copy, reused when present "
        "(under $ATLASLDM_CACHE when set)",
    )
    worker = sub.choices["worker"]
    worker.add_argument("--loader", choices=["ml", "ours"], required=True, help="which loader")
    worker.add_argument("--uri", required=True, help="experiment URI or copy folder")
    worker.add_argument("--mode", choices=["direct", "copy"], required=True, help="stream mode")
    worker.add_argument("--vocab", default="", help="genes.tsv (direct mode)")
    worker.add_argument("--seed", type=int, default=0, help="shuffle seed")
    worker.add_argument("--io-batch", type=int, default=ML_IO, help="tiledbsoma-ml io_batch_size")
    worker.add_argument("--dense", action="store_true", help="tiledbsoma-ml dense X (its default)")
    worker.add_argument(
        "--row-store", choices=["auto", "off"], default="auto", help="copy mode: row store use"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `bench_loader.py [run options]` or the internal `worker` subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "worker"):
        argv = ["run", *argv]
    opts = build_parser().parse_args(argv)
    if opts.command == "worker":
        print(json.dumps(run_worker(opts)), flush=True)
    else:
        print(json.dumps(run_benchmark(opts)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

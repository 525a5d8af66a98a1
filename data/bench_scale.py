"""Scale benchmark of the data path: sampler sweep, multi-rank stream timing, flatness in N.

Three parts (`--parts`), all in one JSON report (`--out`; it is also the last printed line):

1. **sweep** (pure numpy, no IO): for W = 1, 2, 4, ... `--max-world-size` on a Census-layout
   label vector (N cells, D contiguous `dataset_id` blocks of random sizes), in copy mode (the
   copy is pre-permuted at ingest, so its labels are a random permutation of that layout) and
   direct mode (contiguous labels), every rank's `LockstepSampler` is built from
   `stream_layout` and its epoch-0 plans are checked: exactly once (union of all ranks' rows is
   every row once), step balance (equal batch counts, batch sizes), per-batch dataset diversity
   against random batches of the same size, and each rank's epoch mix (total-variation distance
   from the global mix, beside the same figure for a uniformly random split into W parts).
   Exactly-once, balance and the epoch mix use every rank; diversity the `--max-eval-ranks`
   ranks chosen evenly.
2. **timing**: W = 1, 2, 4 ranks as separate processes started together (a file barrier after
   construction), each a `CellStream(cfg, split, rank=r, world_size=W)` on a synthetic corpus in
   direct mode (the Census-layout experiment) and copy mode (its training copy): cells/s per
   rank and in total, CPU-seconds, peak RSS (VmHWM) per rank, per-batch diversity.
3. **flat**: one rank, corpora of `--flat-cells` sizes with `--genes` genes: peak RSS of a fresh
   process, start-up (construction to first batch), the first batch after `load_state_dict` at
   mid-epoch (in another fresh process), `len(json.dumps(state_dict()))`, the ratio
   largest/smallest of each, and the disk the corpora take.

Corpora are generated (`data/synthetic.py`) and ingested (`data.ingest`) once under `--cache`.
Only the public entry points of the sampler and stream are used, so the benchmark survives
changes of their internals.
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

from atlasldm.data.bench_scale_stream import run_flat, run_timing, run_worker
from atlasldm.data.bench_scale_sweep import run_sweep

DEFAULT_CACHE = "/tmp/atlasldm_bench_scale"
MODES = ("copy", "direct")


# ----------------------------------------------------------------------------------------------
# Corpora


def corpus_paths(cache: Path, cells: int, genes: int, datasets: int) -> tuple[Path, Path, Path]:
    """Return (Census-layout experiment, training copy, build record) paths of a corpus."""
    root = Path(cache) / f"synthetic_{cells}x{genes}_d{datasets}"
    return root / "census_layout", root / "training_copy", root / "build.json"


def build_corpus(cache: Path, cells: int, genes: int, datasets: int, copy: bool = True) -> dict:
    """Generate (and ingest, when `copy`) a synthetic corpus once; reuse it when complete.

    Returns {census, copy (None when not built), vocab, generate_s, ingest_s (when built here or
    recorded by an earlier build)}.
    """
    from atlasldm.data import ingest
    from atlasldm.data.synthetic import write_synthetic_experiment

    census, training, record = corpus_paths(cache, cells, genes, datasets)
    info = json.loads(record.read_text()) if record.is_file() else {}
    spec = f"cells={cells},genes={genes},datasets={datasets},cell_types=12,seed=0"
    t0 = time.perf_counter()
    reused = Path(str(census) + ".complete.json").is_file()
    write_synthetic_experiment(census, spec)
    if not reused:
        info["generate_s"] = time.perf_counter() - t0
    if copy and not (training / "manifest.json").is_file():
        t0 = time.perf_counter()
        argv = ["--source", str(census), "--out", str(training), "--conditions", "dataset_id",
                "cell_type", "--resume", "--log-level", "WARNING"]  # fmt: skip
        if ingest.main(argv) != 0:
            raise RuntimeError(f"ingest failed: {argv}")
        info["ingest_s"] = time.perf_counter() - t0
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(info))
    vocab = census.parent / "genes.tsv"
    if not vocab.is_file():
        _write_vocab(str(census), vocab)
    have_copy = (training / "manifest.json").is_file()
    from atlasldm.data.rowstore import has_row_store

    return {"census": str(census), "copy": str(training) if have_copy else None,
            "row_store": have_copy and has_row_store(training),
            "vocab": str(vocab), **info}  # fmt: skip


def _write_vocab(census_uri: str, path: Path) -> None:
    """genes.tsv of the experiment's var (feature_id, feature_name), for direct mode."""
    import tiledbsoma

    from atlasldm.data.vocab import GeneVocab

    with tiledbsoma.Experiment.open(census_uri) as exp:
        var = exp.ms["RNA"].var.read(column_names=["soma_joinid", "feature_id", "feature_name"])
        var = var.concat().sort_by("soma_joinid")
    GeneVocab(var["feature_id"].to_pylist(), var["feature_name"].to_pylist()).save(path)


def corpus_stats(census_uri: str) -> dict[str, Any]:
    """Cells, mean/min/max nonzeros per cell and dataset_id label counts (from obs)."""
    import tiledbsoma

    with tiledbsoma.Experiment.open(census_uri) as exp:
        obs = exp.obs.read(column_names=["soma_joinid", "dataset_id", "nnz"]).concat()
    nnz = obs["nnz"].to_numpy()
    counts = np.unique(obs["dataset_id"].to_numpy(zero_copy_only=False).astype(str),
                       return_counts=True)[1]  # fmt: skip
    return {"cells": len(nnz), "mean_nnz": float(nnz.mean()), "min_nnz": int(nnz.min()),
            "max_nnz": int(nnz.max()), "dataset_counts": counts.tolist()}  # fmt: skip


def _code_state() -> dict[str, Any]:
    """The measured code: git HEAD and the data/ files modified in the working tree."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "data"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"git_head": head, "data_files_modified": [ln[3:] for ln in dirty.splitlines()]}


def run_benchmark(opts: argparse.Namespace) -> dict[str, Any]:
    """Run the selected parts; write and return the report."""
    t0 = time.perf_counter()
    report: dict[str, Any] = {"argv": opts.argv, "cpu_count": os.cpu_count(), **_code_state()}
    if "sweep" in opts.parts:
        report["sweep"] = run_sweep(opts)
    corpora: dict[int, dict] = {}
    stats: dict[int, dict] = {}

    def corpus(n: int) -> dict:
        if n not in corpora:
            want_copy = "copy" in opts.modes and (
                not opts.copy_max_cells or n <= opts.copy_max_cells
            )
            t = time.perf_counter()
            corpora[n] = build_corpus(Path(opts.cache), n, opts.genes, opts.datasets, want_copy)
            stats[n] = corpus_stats(corpora[n]["census"])
            corpora[n].update(mean_nnz=stats[n]["mean_nnz"], min_nnz=stats[n]["min_nnz"],
                              max_nnz=stats[n]["max_nnz"])  # fmt: skip
            print(f"corpus N={n:,} x {opts.genes} genes ready in {time.perf_counter() - t:.0f} s"
                  f" (mean nnz/cell {stats[n]['mean_nnz']:.0f})", flush=True)  # fmt: skip
        return corpora[n]

    if "timing" in opts.parts:
        report["timing"] = run_timing(opts, corpus(opts.timing_cells), stats[opts.timing_cells])
    if "flat" in opts.parts:
        report["flat"] = run_flat(opts, {n: corpus(n) for n in opts.flat_cells})
    report["corpora"] = {str(n): c for n, c in corpora.items()}
    sweep = report.get("sweep", {})
    report["exactly_once"] = sweep.get("exactly_once")
    report["balanced"] = sweep.get("balanced")
    resumes = [r["resume_matches"] for m in report.get("flat", {}).get("modes", {}).values()
               for r in m.values()]  # fmt: skip
    report["resume_matches"] = all(resumes) if resumes else None
    report["ok"] = all(
        v is not False
        for v in (report["exactly_once"], report["balanced"], report["resume_matches"])
    )
    report["wall_s"] = time.perf_counter() - t0
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """Options of `launchers/bench_scale.py` (all have defaults) and its internal workers."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=fmt)
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", formatter_class=fmt, help="run the benchmark (default)")
    workers = [sub.add_parser(n, formatter_class=fmt, help="internal: one measured process")
               for n in ("worker-time", "worker-flat")]  # fmt: skip
    for q in [run, *workers]:
        q.add_argument("--micro-batch", type=int, default=256, help="cells per batch per rank")
        q.add_argument("--seed", type=int, default=0, help="sampler / label-layout seed")
        q.add_argument("--threads", type=int, default=2, help="reader threads per rank")
        q.add_argument("--memory-budget-gb", type=float, default=4.0,
                       help="DataConfig.memory_budget_gb (sizes K)")  # fmt: skip
        q.add_argument("--split", default="train", choices=["train", "all"],
                       help="stream split (val_fraction 0: train is every cell)")  # fmt: skip
        q.add_argument("--chunk-cells", type=int, default=0,
                       help="DataConfig.chunk_cells of the streams (0: their own)")  # fmt: skip
    run.add_argument("--parts", nargs="+", default=["sweep", "timing", "flat"],
                     choices=["sweep", "timing", "flat"], help="parts to run")  # fmt: skip
    run.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                     help="stream modes measured in every part")  # fmt: skip
    run.add_argument("--out", default=f"{DEFAULT_CACHE}/bench_scale.json", help="JSON report")
    run.add_argument("--cache", default=DEFAULT_CACHE, help="folder of generated corpora")
    run.add_argument("--datasets", type=int, default=20,
                     help="contiguous dataset_id blocks (sweep labels and corpora)")  # fmt: skip
    run.add_argument("--sweep-cells", type=int, nargs="+", default=[1_000_000, 50_000],
                     help="sweep: label-vector lengths N")  # fmt: skip
    run.add_argument("--max-world-size", type=int, default=1024,
                     help="sweep: W = 1, 2, 4, ... up to this")  # fmt: skip
    run.add_argument("--max-eval-ranks", type=int, default=64,
                     help="sweep: ranks (evenly chosen) whose batch diversity is evaluated; "
                     "exactly-once, balance and epoch mix always use every rank")  # fmt: skip
    run.add_argument(
        "--mean-nnz",
        type=float,
        default=2000.0,
        help="sweep: mean nonzeros per cell given to stream_layout (sizes K)",
    )
    run.add_argument("--genes", type=int, default=2000, help="genes of the synthetic corpora")
    run.add_argument(
        "--timing-cells",
        type=int,
        default=500_000,
        help="timing: cells of the corpus (shared with --flat-cells if equal)",
    )
    run.add_argument(
        "--timing-world-sizes",
        type=int,
        nargs="+",
        default=[1, 2, 4],
        help="timing: world sizes, ranks run as concurrent processes",
    )
    run.add_argument(
        "--epochs",
        type=int,
        default=2,
        help="timing: full epochs each rank iterates (all ranks together read the corpus "
        "this many times; the first batch is not timed)",
    )
    run.add_argument(
        "--max-cells",
        type=int,
        default=0,
        help="timing: stop a rank after this many timed cells (0 = no limit)",
    )
    run.add_argument(
        "--seconds",
        type=float,
        default=120.0,
        help="timing: seconds timed per rank at most (after its first batch)",
    )
    run.add_argument(
        "--flat-cells",
        type=int,
        nargs="+",
        default=[500_000, 5_000_000],
        help="flat: corpus sizes (ratios are largest/smallest)",
    )
    run.add_argument(
        "--flat-batches",
        type=int,
        default=200,
        help="flat: batches after the first before peak RSS is read",
    )
    run.add_argument("--copy-max-cells", type=int, default=0,
                     help="build training copies only up to this many cells (0 = always); "
                     "larger corpora are measured in direct mode only")  # fmt: skip
    run.add_argument("--inline", action="store_true",
                     help="run measured workers in this process, one by one (tests: RSS and "
                     "start-up figures are then not per fresh process)")  # fmt: skip
    for q in workers:
        q.add_argument("--mode", choices=MODES, required=True, help="stream mode")
        q.add_argument("--source", required=True, help="copy folder or experiment URI")
        q.add_argument("--vocab", default="", help="genes.tsv (direct mode)")
    wt, wf = workers
    wt.add_argument("--rank", type=int, default=0, help="this rank")
    wt.add_argument("--world-size", type=int, default=1, help="ranks")
    wt.add_argument("--epochs", type=int, default=1, help="epochs to iterate")
    wt.add_argument("--max-cells", type=int, default=0, help="timed cells at most (0 = all)")
    wt.add_argument("--seconds", type=float, default=60.0, help="timed seconds at most")
    wt.add_argument("--label-counts", default="[]", help="JSON dataset_id counts (random ref.)")
    wt.add_argument("--barrier", default="", help="folder of ready files ('' = no barrier)")
    wf.add_argument("--phase", choices=["start", "resume"], required=True, help="what to time")
    wf.add_argument("--state-file", required=True, help="mid-epoch state (written by start)")
    wf.add_argument("--batches", type=int, default=200, help="steady batches before RSS")
    return p


def _dispatch(opts: argparse.Namespace) -> dict[str, Any]:
    if opts.command in ("worker-time", "worker-flat"):
        return run_worker(opts)
    return run_benchmark(opts)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `bench_scale.py [run options]`; 1 when a correctness check failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "worker-time", "worker-flat"):
        argv = ["run", *argv]
    opts = build_parser().parse_args(argv)
    opts.argv = argv
    result = _dispatch(opts)
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())

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

Corpora are generated (`data/synthetic.py`) and ingested (`data.ingest`) once under `--cache`
(:mod:`.scale_corpus`).
Only the public entry points of the sampler and stream are used, so the benchmark survives
changes of their internals.

Modules: this one runs the parts and writes the report; :mod:`.scale_cli` the command line,
:mod:`.scale_sweep` part 1, :mod:`.scale_stream` parts 2 and 3, :mod:`.scale_workers` the
measured processes (`python -m atlasldm.bench.scale worker-time|worker-flat ...`).
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

import atlasldm.data
from atlasldm.bench.scale_cli import parse_args
from atlasldm.bench.scale_corpus import Corpora
from atlasldm.bench.scale_stream import run_flat, run_timing
from atlasldm.bench.scale_sweep import run_sweep
from atlasldm.bench.scale_workers import run_worker


def _git(args: list[str], folder: Path) -> str:
    done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True)
    return done.stdout


def code_state() -> dict[str, Any]:
    """The measured code: git HEAD and the data/ files modified, when data/ is a git checkout.

    Asked of the folder the imported `atlasldm.data` lives in (an editable install's checkout);
    an installed wheel has no git history and records nothing.
    """
    folder = Path(atlasldm.data.__file__).resolve().parent
    try:
        head = _git(["rev-parse", "HEAD"], folder).strip()
        dirty = _git(["status", "--porcelain", "--", "."], folder)
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"git_head": head, "data_files_modified": [ln[3:] for ln in dirty.splitlines()]}


def add_checks(report: dict[str, Any]) -> None:
    """Add the correctness verdicts (None when a part did not run) and `ok` to the report."""
    sweep = report.get("sweep", {})
    report["exactly_once"] = sweep.get("exactly_once")
    report["balanced"] = sweep.get("balanced")
    flat_modes = report.get("flat", {}).get("modes", {}).values()
    resumes = [r["resume_matches"] for rows in flat_modes for r in rows.values()]
    report["resume_matches"] = all(resumes) if resumes else None
    verdicts = (report["exactly_once"], report["balanced"], report["resume_matches"])
    report["ok"] = all(v is not False for v in verdicts)


def run_benchmark(opts: argparse.Namespace) -> dict[str, Any]:
    """Run the selected parts; write and return the report."""
    t0 = time.perf_counter()
    report: dict[str, Any] = {"argv": opts.argv, "cpu_count": os.cpu_count(), **code_state()}
    if "sweep" in opts.parts:
        report["sweep"] = run_sweep(opts)
    corpora = Corpora(opts)
    if "timing" in opts.parts:
        corpus = corpora.get(opts.timing_cells)
        report["timing"] = run_timing(opts, corpus, corpora.stats[opts.timing_cells])
    if "flat" in opts.parts:
        report["flat"] = run_flat(opts, {n: corpora.get(n) for n in opts.flat_cells})
    report["corpora"] = {str(n): c for n, c in corpora.built.items()}
    add_checks(report)
    report["wall_s"] = time.perf_counter() - t0
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `bench_scale.py [run options]`; 1 when a correctness check failed."""
    opts = parse_args(list(sys.argv[1:] if argv is None else argv))
    result = run_benchmark(opts) if opts.command == "run" else run_worker(opts)
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())

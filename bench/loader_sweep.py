"""Size sweep of the loader benchmark: our TileDB reads against tiledbsoma-ml at several sizes.

`python launchers/bench_loader.py --sizes 100000,500000,2000000` runs, per corpus size (each
built once and cached like the single-size run's, :func:`.loader.build_datasets`), the two
tiledbsoma-ml outputs (default dense and sparse) and ours on both cases: direct mode on the
Census layout, and the training copy read through TileDB and from its row store. Each of our
rows is divided by the tiledbsoma-ml runs of the same case, size and invocation. No peer formats
(h5ad, annbatch), no probes and no 2-process runs: only what the comparison needs. Prints a
markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import copy as copy_mod
import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from atlasldm.bench import loader
from atlasldm.bench.diversity import RandomEntropy
from atlasldm.bench.loader_peers_measure import BATCH

ML_DEFAULT, ML_SPARSE = list(loader.ML_RUNS)[:2]  # the two tiledbsoma-ml outputs compared
# Our runs in a sweep: the TileDB reads and the row store (not the runs on a peer's format).
OURS_RUNS = (
    loader.OURS["a_census_layout"],
    loader.OURS_COPY_TILEDB,
    loader.OURS["b_training_copy"],
)
SWEEP_LOADERS = ("ml", "ours")  # the loaders a sweep can run (--loaders is intersected)
# A run's whole second epoch (--epoch-seconds; None where it did not end in time).
EPOCH_KEYS = ("epoch_cells", "epoch_seconds", "epoch_cpu_seconds", "epoch_cells_per_s")
CASE_LABEL = {"a_census_layout": "Census layout", "b_training_copy": "training copy"}


def sweep_runs(opts: argparse.Namespace, case: str, uri: str, copy: Path) -> list:
    """The runs of one case in a sweep: tiledbsoma-ml's default and sparse, then ours."""
    peers = {"h5ad": None, "annbatch": None, "skipped": {}}  # no peer formats in a sweep
    runs = loader.case_runs(opts, case, uri, copy, peers)
    return [r for r in runs if r[0] in (ML_DEFAULT, ML_SPARSE, *OURS_RUNS)]


def ns_per_nnz(row: dict) -> float | None:
    """Process CPU nanoseconds per nonzero delivered (None when no nonzero was counted)."""
    rate = row.get("nnz_per_cpu_s") or 0.0
    return 1e9 / rate if rate > 0 else None


def table_rows(cells: int, cases: dict[str, dict[str, dict]]) -> list[dict]:
    """One record per run of one size; ours carry their ratios to the same case's ml runs."""
    out = []
    for case, rows in cases.items():
        for name, r in rows.items():
            rec = {
                "cells": cells,
                "case": case,
                "loader": name,
                "cells_per_s": r["cells_per_s"],
                "cpu_ns_per_nnz": ns_per_nnz(r),
                "cpu_seconds": r["cpu_seconds"],
                "wall_seconds": r["seconds"],
                "peak_rss_gb": r["peak_rss_gb"],
                "diversity": r["diversity_vs_random"],
                "first_batch_s": r["first_batch_s"],
            }
            rec |= {key: r.get(key) for key in EPOCH_KEYS}
            if r["loader"] == "ours":
                rec |= ratios(r, rows, "cells_per_s", "vs_ml")
                rec |= ratios(r, rows, "epoch_cells_per_s", "epoch_vs_ml")
            out.append(rec)
    return out


def ratios(ours: dict, rows: dict[str, dict], rate: str, prefix: str) -> dict:
    """`{prefix}_default`, `{prefix}_sparse`: our `rate` over each tiledbsoma-ml run's (None
    where that run is missing or has no such figure)."""
    out = {}
    for suffix, ml_name in (("default", ML_DEFAULT), ("sparse", ML_SPARSE)):
        base = rows.get(ml_name, {}).get(rate)
        mine = ours.get(rate)
        out[f"{prefix}_{suffix}"] = mine / base if base and mine is not None else None
    return out


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _ratio(r: dict, key: str) -> str:
    """A ratio cell: '' for a peer's own row, n/a when its base did not run."""
    if key not in r:
        return ""
    return "n/a" if r[key] is None else f"{r[key]:.2f}x"


def _table(records: list[dict], columns: list[str], cells_of) -> str:
    """A markdown table: cells, case and loader (each size and case named once), then
    `columns` filled by `cells_of(record)`."""
    lines = ["| " + " | ".join(["cells", "case", "loader", *columns]) + " |"]
    lines.append("|" + "---|" * (3 + len(columns)))
    prev: tuple = (None, None)
    for r in records:
        cells = f"{r['cells']:,}" if r["cells"] != prev[0] else ""
        case = CASE_LABEL.get(r["case"], r["case"]) if (r["cells"], r["case"]) != prev else ""
        prev = (r["cells"], r["case"])
        lines.append("| " + " | ".join([cells, case, r["loader"], *cells_of(r)]) + " |")
    return "\n".join(lines)


def markdown(records: list[dict]) -> str:
    """The sweep as markdown: the window's table, then the second epochs' (`epoch_markdown`).

    Ratios in x, CPU ns per nonzero, RSS in GiB. Throughput is timed after the first batch,
    which waits for a loader's first read: tiledbsoma-ml's first 65,536-cell I/O batch, our
    first round (hence the last column).
    """
    columns = ["cells/s", "x ml default", "x ml sparse", "CPU ns/nnz", "CPU s / wall s"]
    columns += ["peak RSS GiB", "diversity", "first batch s"]

    def cells_of(r: dict) -> list[str]:
        return [
            f"{r['cells_per_s']:,.0f}",
            *(_ratio(r, k) for k in ("vs_ml_default", "vs_ml_sparse")),
            _num(r["cpu_ns_per_nnz"], ".0f"),
            f"{r['cpu_seconds']:.1f} / {r['wall_seconds']:.1f}",
            f"{r['peak_rss_gb']:.2f}",
            _num(r["diversity"], ".3f"),
            f"{r['first_batch_s']:.1f}",
        ]

    epochs = epoch_markdown(records)
    return _table(records, columns, cells_of) + (f"\n\n{epochs}" if epochs else "")


def epoch_markdown(records: list[dict]) -> str:
    """Each run's whole second epoch as a markdown table ('' when none was timed).

    The second epoch holds every read of an epoch, its first read included, and none of the
    process's one-off costs. Runs whose second epoch did not end within --epoch-seconds of their
    start show n/a.
    """
    if not any(r.get("epoch_seconds") for r in records):
        return ""
    columns = ["second epoch s", "cells/s", "x ml default", "x ml sparse", "CPU s"]

    def cells_of(r: dict) -> list[str]:
        return [
            _num(r["epoch_seconds"], ".1f"),
            _num(r["epoch_cells_per_s"], ",.0f"),
            *(_ratio(r, k) for k in ("epoch_vs_ml_default", "epoch_vs_ml_sparse")),
            _num(r["epoch_cpu_seconds"], ".1f"),
        ]

    return _table(records, columns, cells_of)


def run_sweep(opts: argparse.Namespace) -> dict:
    """Build (or reuse) each size's corpus and copy, run every case; print and return it."""
    opts = copy_mod.copy(opts)
    opts.loaders = [x for x in opts.loaders if x in SWEEP_LOADERS]
    opts.two_process = False
    cache = Path(opts.cache)
    summary: dict = {"sizes": opts.sizes, "genes": opts.genes, "datasets": opts.datasets}
    summary |= {"batch": BATCH, "seconds": opts.seconds, "max_cells": opts.max_cells}
    summary |= {"date": datetime.date.today().isoformat(), "command": opts.command_line}
    records: list[dict] = []
    for cells in opts.sizes:
        census_uri, copy = loader.build_datasets(cache, cells, opts.genes, opts.datasets)
        rand = RandomEntropy(np.bincount(loader._dataset_codes(census_uri)))
        cases = {"a_census_layout": census_uri, "b_training_copy": str(copy / "experiment")}
        measured = {
            case: loader.measure_case(
                opts, case, sweep_runs(opts, case, uri, copy), rand, probe=False
            )
            for case, uri in cases.items()
        }
        records += table_rows(cells, measured)
    summary["rows"] = records
    print(markdown(records), flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """`bench_loader.py` with `--sizes` handled by this sweep (the launcher's entry point)."""
    return loader.main(argv, sweep=run_sweep)

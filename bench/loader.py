"""Loader benchmark: our CellStream against tiledbsoma-ml, scDataset and annbatch on one corpus.

Two cases, every loader in fresh subprocesses (so peak RSS is per loader), batch 256:
  (a) the Census-layout experiment (X tiles 2048 x 2048, rows grouped by dataset): our stream in
      direct mode; tiledbsoma-ml on the same experiment; scDataset on the same cells written as
      a backed h5ad (its recommended settings and the annbatch paper's);
  (b) prepared copies: our training copy (rows pre-permuted; read from its row store and once
      through TileDB), tiledbsoma-ml on the copy's experiment, and annbatch on its own shuffled
      zarr collection written from the h5ad by annbatch's writer (in a Python >= 3.12 venv,
      :mod:`.loader_peers_env`; skipped with the reason printed when that is impossible).
Per run: cells/s, nonzeros per CPU-second, peak RSS, time to the first batch, per-batch
`dataset_id` entropy relative to random batches; then each loader that shards over ranks once
more as 2 processes. Also printed: each format's preparation time and disk size, and whether each
loader resumes mid-epoch and reorders between epochs (tested where the loader allows it). The
last line printed is one JSON object with every figure. Runs: :mod:`.loader_worker`,
:mod:`.loader_peers_annbatch`; orchestration of the peers: :mod:`.loader_peers`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from atlasldm.bench import loader_peers as peers_mod
from atlasldm.bench.diversity import RandomEntropy
from atlasldm.bench.loader_peers_env import ANNBATCH_PINS
from atlasldm.bench.loader_peers_measure import BATCH
from atlasldm.bench.loader_peers_scdataset import SETTINGS as SCD_SETTINGS
from atlasldm.bench.loader_worker import ML_IO, run_worker
from atlasldm.cli_parser import Parser

ML_IO_SMALL = 16384  # a tiledbsoma-ml I/O batch whose peak RSS is near our 4 GB budget
DEFAULT_CACHE = Path(os.environ.get("ATLASLDM_CACHE", Path.home() / ".cache" / "atlasldm"))
LOADERS = ("ml", "scdataset", "annbatch", "ours")
# The tiledbsoma-ml run that also runs as 2 ranks: two at its default I/O batch would need
# ~20 GB here, the smaller I/O batch ~5 GB per rank.
ML_TWO_PROCESS = f"tiledbsoma-ml sparse, I/O batch {ML_IO_SMALL:,}"
ML_RUNS = {  # printed name -> worker flags of each tiledbsoma-ml run
    "tiledbsoma-ml default (dense)": {"--dense": True},
    "tiledbsoma-ml sparse": {},
    ML_TWO_PROCESS: {"--io-batch": ML_IO_SMALL},
}
OURS = {"a_census_layout": "atlasldm, direct mode", "b_training_copy": "atlasldm, row store"}
OURS_H5AD = "atlasldm, direct mode on the h5ad"  # the same file scDataset reads
OURS_COPY_TILEDB = "atlasldm, copy read through TileDB"
# Resume / epoch order of the loaders that cannot be tested here (tiledbsoma-ml 0.1.0's API).
ML_FEATURES = {
    "resume_mid_epoch": "no (API: no state to save or restore)",
    "order_differs_between_epochs": "only after set_epoch(e) (documented)",
}


def build_datasets(cache: Path, cells: int, genes: int, datasets: int) -> tuple[str, Path]:
    """Return (Census-layout experiment URI, training copy folder), building what is missing."""
    from atlasldm.data import ingest
    from atlasldm.data.rowstore import build_row_store, has_row_store
    from atlasldm.data.synthetic import default_workers, write_synthetic_experiment

    folder = cache / f"synthetic_{cells}x{genes}_d{datasets}"
    folder.mkdir(parents=True, exist_ok=True)
    fresh = not (folder / "census_layout.complete.json").is_file()
    t0 = time.perf_counter()
    census_uri = write_synthetic_experiment(
        folder / "census_layout",
        f"cells={cells},genes={genes},datasets={datasets},cell_types=12,seed=0",
        workers=default_workers(),  # the launchers guard their main module, as spawn needs
    )
    if fresh:
        peers_mod.record_time(folder, "synthetic", time.perf_counter() - t0)
    copy = folder / "training_copy"
    if (copy / "manifest.json").is_file() and not has_row_store(copy):
        build_row_store(copy)  # copies built before the row store existed
    if not (copy / "manifest.json").is_file():
        conditions = ["--conditions", "dataset_id", "cell_type"]
        argv = ["--source", census_uri, "--out", str(copy), *conditions, "--resume"]
        t0 = time.perf_counter()
        if ingest.main(argv) != 0:
            raise RuntimeError(f"ingest failed: {argv}")
        peers_mod.record_time(folder, "ingest", time.perf_counter() - t0)
    return census_uri, copy


def _dataset_codes(uri: str) -> np.ndarray:
    import tiledbsoma

    with tiledbsoma.Experiment.open(uri) as exp:
        col = exp.obs.read(column_names=["dataset_id"]).concat()["dataset_id"].to_numpy()
    return np.unique(col.astype(str), return_inverse=True)[1]


def worker_cmd(opts: argparse.Namespace, flags: dict) -> list[str]:
    """The command of one of our workers (`flags`: its options; True = a bare flag)."""
    shared = {"--seconds": opts.seconds, "--max-cells": opts.max_cells, "--threads": opts.threads}
    shared["--epoch-seconds"] = opts.epoch_seconds
    argv = []
    for key, value in (shared | flags).items():
        argv += [key] if value is True else [key, str(value)]
    return [sys.executable, "-m", "atlasldm.bench.loader", "worker", *argv]


def case_runs(opts: argparse.Namespace, case: str, uri: str, copy: Path, peers: dict) -> list:
    """(printed name, loader, command, runs as 2 ranks too) of each run of one case."""
    mode = "direct" if case == "a_census_layout" else "copy"
    base = {"--uri": uri, "--mode": mode, "--vocab": str(copy / "genes.tsv")}
    runs = [
        (n, "ml", worker_cmd(opts, base | {"--loader": "ml"} | f), n == ML_TWO_PROCESS)
        for n, f in ML_RUNS.items()
    ]
    ours = base | {"--loader": "ours", "--uri": str(copy) if mode == "copy" else uri}
    if mode == "direct":
        for i, name in enumerate(SCD_SETTINGS):
            flags = {"--loader": "scdataset", "--uri": str(peers["h5ad"]), "--setting": i}
            runs.append((name, "scdataset", worker_cmd(opts, base | flags), i == 0))
        h5ad = worker_cmd(opts, ours | {"--uri": str(peers["h5ad"])})
        runs.append((OURS_H5AD, "ours", h5ad, True))
    else:
        tiledb = ours | {"--row-store": "off"}
        runs.append((OURS_COPY_TILEDB, "ours", worker_cmd(opts, tiledb), False))
        if peers["annbatch"] is not None:
            timing = ["--seconds", str(opts.seconds), "--max-cells", str(opts.max_cells)]
            timing += ["--epoch-seconds", str(opts.epoch_seconds)]
            cmd = peers_mod.annbatch_cmd(*peers["annbatch"], timing)
            runs.append(("annbatch (shuffled zarr, chunk 32 x 256)", "annbatch", cmd, True))
    runs.append((OURS[case], "ours", worker_cmd(opts, ours), True))
    return [r for r in runs if r[1] in opts.loaders]


def two_rank_cmd(loader: str, cmd: list[str]) -> list[str]:
    """A run's command for one of 2 ranks: our stream then reads with 1 thread per rank."""
    if loader != "ours":
        return cmd
    i = cmd.index("--threads")
    return [*cmd[: i + 1], "1", *cmd[i + 2 :]]


def measure_case(
    opts, case: str, runs: list, rand: RandomEntropy, probe: bool = True
) -> dict[str, dict]:
    """Every run of one case, by printed name; 2-rank runs under '<name>, 2 processes'.

    `probe` also tests each run's resume and epoch order (the size sweep skips it).
    """
    rows: dict[str, dict] = {}
    for name, loader, cmd, ranks in runs:
        rows[name] = peers_mod.run_one([*cmd, *(["--probe"] if probe else [])], rand)
        rows[name] |= {"loader": loader}
        print_row(case, name, rows[name])
        if ranks and opts.two_process:
            two = f"{name}, 2 processes"
            rows[two] = peers_mod.run_ranks(two_rank_cmd(loader, cmd), rand) | {"loader": loader}
            print_row(case, two, rows[two])
    fill_dense_nnz(rows)
    return rows


def fill_dense_nnz(rows: dict[str, dict]) -> None:
    """A dense tiledbsoma-ml run counts no nonzeros: use its sparse run's nonzeros per cell."""
    dense, sparse = list(ML_RUNS)[:2]
    if dense in rows and sparse in rows and rows[sparse]["cells"]:
        d = rows[dense]
        per_cell = rows[sparse]["nnz"] / rows[sparse]["cells"]
        d["nnz_per_cpu_s"] = per_cell * d["cells"] / d["cpu_seconds"]


def print_row(case: str, name: str, r: dict) -> None:
    """One printed line of the table."""
    div = "n/a" if r["diversity_vs_random"] is None else f"{r['diversity_vs_random']:.3f}"
    print(
        f"{case:16s} {name:58s} {r['cells_per_s']:9.0f} cells/s "
        f"{r['nnz_per_cpu_s'] / 1e6:7.2f} M nnz/cpu-s  rss {r['peak_rss_gb']:.2f} GB  "
        f"diversity {div}  first batch {r['first_batch_s']:.2f} s",
        flush=True,
    )


def features(cases: dict[str, dict]) -> dict[str, dict]:
    """Resume mid-epoch / order differs between epochs, per loader, and how it was known."""

    def yes_no(flag: bool) -> str:
        return "yes" if flag else "no"

    out = {"tiledbsoma-ml": dict(ML_FEATURES)}
    for rows in cases.values():
        for name, r in rows.items():
            if "order_differs_tested" not in r:
                continue
            if "resume_exact_tested" in r:
                resume = f"{yes_no(r['resume_exact_tested'])} (tested: exact batch after restore)"
            else:
                resume = f"{yes_no(r['resume_api'])} (API: no state_dict/load_state_dict)"
            order = f"{yes_no(r['order_differs_tested'])} (tested: first batch of 2 passes)"
            out[name] = {"resume_mid_epoch": resume, "order_differs_between_epochs": order}
    return out


def targets(cases: dict[str, dict]) -> dict:
    """The issue's targets: ours vs the best peer per process on (b), vs scDataset on (a)."""
    out: dict = {}
    b = cases.get("b_training_copy", {})
    peers_b = {n: r for n, r in b.items() if r["loader"] != "ours" and "2 processes" not in n}
    if OURS["b_training_copy"] in b and peers_b:
        best = max(peers_b, key=lambda n: peers_b[n]["cells_per_s"])
        out["copy_best_peer"] = best
        out["copy_ratio_vs_best_peer"] = (
            b[OURS["b_training_copy"]]["cells_per_s"] / peers_b[best]["cells_per_s"]
        )
    a = cases.get("a_census_layout", {})
    scd = {n: r for n, r in a.items() if r["loader"] == "scdataset" and "2 processes" not in n}
    if scd:
        best = max(scd, key=lambda n: scd[n]["cells_per_s"])
        out["census_best_scdataset"] = best
        for key, ours in (("census", OURS["a_census_layout"]), ("census_h5ad", OURS_H5AD)):
            if ours in a:
                out[f"{key}_ratio_vs_scdataset"] = a[ours]["cells_per_s"] / scd[best]["cells_per_s"]
                out[f"{key}_diversity_minus_scdataset"] = _diversity_gap(a[ours], scd[best])
    return out


def _diversity_gap(ours: dict, peer: dict) -> float | None:
    """Our per-batch diversity minus the peer's (None when either is unknown)."""
    a, b = ours["diversity_vs_random"], peer["diversity_vs_random"]
    return None if a is None or b is None else a - b


def versions(peer_rows: list[dict]) -> dict[str, str]:
    """Versions of the peers that ran (annbatch's as its venv reported them)."""
    out = {}
    for name in ("tiledbsoma-ml", "tiledbsoma", "scdataset", "anndata", "h5py"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    for r in peer_rows:
        out |= {f"annbatch venv: {k}": v for k, v in r.get("versions", {}).items()}
    return out


def run_benchmark(opts: argparse.Namespace) -> dict:
    """Prepare every format, run every case, print the tables; return the summary."""
    cache = Path(opts.cache)
    census_uri, copy = build_datasets(cache, opts.cells, opts.genes, opts.datasets)
    folder = copy.parent
    peers = peers_mod.prepare_peers(folder, census_uri, cache, opts.annbatch_venv)
    rand = RandomEntropy(np.bincount(_dataset_codes(census_uri)))
    summary: dict = {"cells": opts.cells, "genes": opts.genes, "batch": BATCH}
    summary |= {"date": datetime.date.today().isoformat(), "command": opts.command_line}
    summary["random_batch_entropy"] = rand(BATCH)
    summary["formats"] = peers_mod.formats_table(folder, census_uri, copy, peers)
    for name, f in summary["formats"].items():
        t = "n/a" if f["prepare_s"] is None else f"{f['prepare_s']:.0f} s"
        print(f"format {name:50s} prepare {t:>8s}  disk {f['disk_gb']:.2f} GB", flush=True)
    cases = {"a_census_layout": census_uri, "b_training_copy": str(copy / "experiment")}
    summary["cases"] = {}
    for case, uri in cases.items():
        summary["cases"][case] = measure_case(
            opts, case, case_runs(opts, case, uri, copy, peers), rand
        )
    summary["features"] = features(summary["cases"])
    summary["targets"], summary["skipped"] = targets(summary["cases"]), peers["skipped"]
    annbatch_rows = [
        r for c in summary["cases"].values() for r in c.values() if r["loader"] == "annbatch"
    ]
    summary["versions"] = versions(annbatch_rows)
    summary["annbatch_pins"] = list(ANNBATCH_PINS)
    for name, f in summary["features"].items():
        resume, order = f["resume_mid_epoch"], f["order_differs_between_epochs"]
        print(f"{name:58s} resume: {resume:45s} reorders: {order}", flush=True)
    print(f"targets: {summary['targets']}", flush=True)
    return summary


def _add_timing(q: argparse.ArgumentParser) -> None:
    q.add_argument("--seconds", type=float, default=60.0, help="max timed seconds per run")
    q.add_argument("--max-cells", type=int, default=200_000, help="max timed cells per run")
    q.add_argument("--threads", type=int, default=2, help="our reader threads per rank")
    q.add_argument(
        "--epoch-seconds",
        type=float,
        default=0.0,
        help="also time each run's whole first epoch, start-up included, when it ends within "
        "this many seconds of the loader's start (0: off)",
    )


def _add_run(run: argparse.ArgumentParser) -> None:
    run.add_argument("--cells", type=int, default=500_000, help="cells of the synthetic set")
    run.add_argument("--genes", type=int, default=20_000, help="genes of the synthetic set")
    run.add_argument("--datasets", type=int, default=30, help="dataset_id blocks of the set")
    run.add_argument(
        "--cache",
        default=str(DEFAULT_CACHE / "bench"),
        help="folder of the generated set, its copies and annbatch's venv, reused when present "
        "(under $ATLASLDM_CACHE when set)",
    )
    run.add_argument(
        "--loaders",
        nargs="+",
        choices=LOADERS,
        default=list(LOADERS),
        help="loaders to run (ml = tiledbsoma-ml, ours = atlasldm)",
    )
    run.add_argument(
        "--annbatch-venv",
        choices=["create", "existing", "off"],
        default="create",
        help="annbatch's Python >= 3.12 venv: create it when missing (pip), use "
        "it only if present, or skip annbatch",
    )
    run.add_argument(
        "--no-two-process", dest="two_process", action="store_false", help="skip the 2-rank runs"
    )
    run.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="comma-separated corpus sizes (cells): run the size sweep instead (tiledbsoma-ml "
        "and ours on each size, bench/loader_sweep.py); --cells is then unused",
    )


def _add_worker(worker: argparse.ArgumentParser) -> None:
    worker.add_argument("--loader", choices=["ml", "ours", "scdataset"], required=True)
    worker.add_argument("--uri", required=True, help="experiment URI, copy folder or h5ad")
    worker.add_argument("--mode", choices=["direct", "copy"], required=True, help="stream mode")
    worker.add_argument("--vocab", default="", help="genes.tsv (direct mode)")
    worker.add_argument("--seed", type=int, default=0, help="shuffle seed")
    worker.add_argument("--io-batch", type=int, default=ML_IO, help="tiledbsoma-ml io_batch_size")
    worker.add_argument("--dense", action="store_true", help="tiledbsoma-ml dense X (its default)")
    worker.add_argument(
        "--row-store", choices=["auto", "off"], default="auto", help="copy mode: row store use"
    )
    worker.add_argument("--setting", type=int, default=0, help="scDataset: index in SETTINGS")
    worker.add_argument("--rank", type=int, default=0, help="this process's rank")
    worker.add_argument("--world", type=int, default=1, help="ranks in all")
    worker.add_argument("--codes-out", default="", help=".npz for the timed batches' codes")
    worker.add_argument("--probe", action="store_true", help="also test resume and epoch order")


def build_parser() -> argparse.ArgumentParser:
    """Options of `launchers/bench_loader.py` (all have defaults: no arguments needed)."""
    p = Parser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    for name, what in (("run", "run the benchmark (default)"), ("worker", "internal: one run")):
        _add_timing(sub.add_parser(name, description=__doc__.splitlines()[0], help=what))
    _add_run(sub.choices["run"])
    _add_worker(sub.choices["worker"])
    return p


def check_run(opts: argparse.Namespace) -> str:
    """The first problem with the run options, as one line ('' when none)."""
    for flag in ("cells", "genes", "datasets", "max_cells", "threads"):
        if getattr(opts, flag) < 1:
            return f"--{flag.replace('_', '-')} must be >= 1, got {getattr(opts, flag)}"
    if not opts.seconds > 0:
        return f"--seconds must be > 0, got {opts.seconds}"
    if not opts.epoch_seconds >= 0:
        return f"--epoch-seconds must be >= 0 (0: off), got {opts.epoch_seconds}"
    if opts.datasets > opts.cells:
        return f"--datasets ({opts.datasets}) must not exceed --cells ({opts.cells})"
    if opts.cells < 2 * BATCH:
        return f"--cells must be >= {2 * BATCH} (two batches of {BATCH}), got {opts.cells}"
    if opts.sizes:
        problem = check_sizes(opts)
        if problem:
            return problem
    cache = Path(opts.cache)
    if cache.exists() and not cache.is_dir():
        return f"--cache {cache} is a file; give a folder"
    return ""


def main(argv: Sequence[str] | None = None, sweep=None) -> int:
    """Entry point: `bench_loader.py [run options]` or the internal `worker` subcommand.

    `sweep(opts) -> summary` runs `--sizes` (bench/loader_sweep.py, which imports this module
    and passes its `run_sweep`; `loader_sweep.main` is the launcher's entry).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "worker"):
        argv = ["run", *argv]
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.command == "worker":
        print(json.dumps(run_worker(opts)), flush=True)
        return 0
    problem = check_run(opts)
    if problem:
        parser.exit(2, f"error: {problem}\n")
    opts.command_line = "python launchers/bench_loader.py " + " ".join(argv[1:])
    if opts.sizes:
        if sweep is None:
            parser.exit(2, "error: --sizes runs through atlasldm.bench.loader_sweep.main\n")
        print(json.dumps(sweep(opts)), flush=True)
        return 0
    print(json.dumps(run_benchmark(opts)), flush=True)
    return 0


def _sizes(text: str) -> list[int]:
    """argparse type of --sizes: '100000,500000' -> [100000, 500000]."""
    try:
        return parse_sizes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give cell counts like 100000,500000: {text!r}") from None


def parse_sizes(text: str) -> list[int]:
    """`--sizes 100000,500000` as a list of ints (argparse type; ValueError on a bad item)."""
    sizes = [int(s.replace("_", "")) for s in text.split(",") if s.strip()]
    if not sizes:
        raise ValueError("no size given")
    return sizes


def check_sizes(opts: argparse.Namespace) -> str:
    """The first problem with --sizes, as one line ('' when none)."""
    for cells in opts.sizes or []:
        if cells < 2 * BATCH:
            return f"--sizes: every size must be >= {2 * BATCH} (two batches), got {cells}"
        if opts.datasets > cells:
            return f"--sizes: --datasets ({opts.datasets}) exceeds the size {cells}"
    return ""


if __name__ == "__main__":
    sys.exit(main())

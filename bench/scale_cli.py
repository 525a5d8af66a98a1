"""Command line of the scale benchmark (`launchers/bench_scale.py --help`) and its workers."""

from __future__ import annotations

import argparse

DESCRIPTION = (
    "Scale benchmark of the data path: sampler sweep, multi-rank stream timing, flatness in N."
)
DEFAULT_CACHE = "/tmp/atlasldm_bench_scale"
MODES = ("copy", "direct")
COMMANDS = ("run", "worker-time", "worker-flat")


def add_stream_options(q: argparse.ArgumentParser) -> None:
    """Options of the streams, shared by the run and its measured workers."""
    q.add_argument("--micro-batch", type=int, default=256, help="cells per batch per rank")
    q.add_argument("--seed", type=int, default=0, help="sampler / label-layout seed")
    q.add_argument("--threads", type=int, default=2, help="reader threads per rank")
    q.add_argument(
        "--memory-budget-gb", type=float, default=4.0, help="DataConfig.memory_budget_gb (sizes K)"
    )
    q.add_argument(
        "--split",
        default="train",
        choices=["train", "all"],
        help="stream split (val_fraction 0: train is every cell)",
    )
    q.add_argument(
        "--chunk-cells",
        type=int,
        default=0,
        help="DataConfig.chunk_cells of the streams (0: their own)",
    )


def add_run_options(run: argparse.ArgumentParser) -> None:
    """What to run, where, and on which corpora; the sweep's options."""
    parts = ["sweep", "timing", "flat"]
    run.add_argument("--parts", nargs="+", default=parts, choices=parts, help="parts to run")
    run.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        choices=MODES,
        help="stream modes measured in every part",
    )
    run.add_argument("--out", default=f"{DEFAULT_CACHE}/bench_scale.json", help="JSON report")
    run.add_argument("--cache", default=DEFAULT_CACHE, help="folder of generated corpora")
    run.add_argument(
        "--datasets",
        type=int,
        default=20,
        help="contiguous dataset_id blocks (sweep labels and corpora)",
    )
    run.add_argument(
        "--sweep-cells",
        type=int,
        nargs="+",
        default=[1_000_000, 50_000],
        help="sweep: label-vector lengths N",
    )
    run.add_argument(
        "--max-world-size", type=int, default=1024, help="sweep: W = 1, 2, 4, ... up to this"
    )
    run.add_argument(
        "--max-eval-ranks",
        type=int,
        default=64,
        help="sweep: ranks (evenly chosen) whose batch diversity is evaluated; "
        "exactly-once, balance and epoch mix always use every rank",
    )
    run.add_argument(
        "--mean-nnz",
        type=float,
        default=2000.0,
        help="sweep: mean nonzeros per cell given to stream_layout (sizes K)",
    )
    run.add_argument("--genes", type=int, default=2000, help="genes of the synthetic corpora")


def add_timing_options(run: argparse.ArgumentParser) -> None:
    """Options of part 2, the multi-rank timing."""
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


def add_flat_options(run: argparse.ArgumentParser) -> None:
    """Options of part 3 (flatness in N) and of how workers run."""
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
    run.add_argument(
        "--copy-max-cells",
        type=int,
        default=0,
        help="build training copies only up to this many cells (0 = always); "
        "larger corpora are measured in direct mode only",
    )
    run.add_argument(
        "--inline",
        action="store_true",
        help="run measured workers in this process, one by one (tests: RSS and "
        "start-up figures are then not per fresh process)",
    )


def add_worker_options(wt: argparse.ArgumentParser, wf: argparse.ArgumentParser) -> None:
    """Options of the internal `worker-time` and `worker-flat` processes."""
    for q in (wt, wf):
        q.add_argument("--mode", choices=MODES, required=True, help="stream mode")
        q.add_argument("--source", required=True, help="copy folder or experiment URI")
        q.add_argument("--vocab", default="", help="genes.tsv (direct mode)")
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


def build_parser() -> argparse.ArgumentParser:
    """Options of `launchers/bench_scale.py` (all have defaults) and its internal workers."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=fmt)
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", formatter_class=fmt, help="run the benchmark (default)")
    workers = [
        sub.add_parser(n, formatter_class=fmt, help="internal: one measured process")
        for n in COMMANDS[1:]
    ]
    for q in [run, *workers]:
        add_stream_options(q)
    add_run_options(run)
    add_timing_options(run)
    add_flat_options(run)
    add_worker_options(*workers)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; no subcommand means `run`. `argv` is kept for the report."""
    if not argv or argv[0] not in COMMANDS:
        argv = ["run", *argv]
    opts = build_parser().parse_args(argv)
    opts.argv = argv
    return opts

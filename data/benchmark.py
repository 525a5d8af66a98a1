"""Loader benchmark: our CellStream against tiledbsoma-ml's ExperimentDataset on the same data.

Two cases, each timed for both loaders in fresh subprocesses (so peak RSS is per loader):
  (a) a Census-layout experiment (X tiles 2048 x 2048, rows grouped by dataset), our stream in
      direct mode;
  (b) our training copy (rows pre-permuted, cell tile 256, gene tile = all genes).
tiledbsoma-ml runs with shuffle on, `shuffle_chunk_size=64`, its default I/O batch (65,536) and
`return_sparse_X=True` (its fastest path; dense output would add a densify step we don't pay).
Printed per run: cells/s, nonzeros per CPU-second (per core), peak RSS, mean per-batch
`dataset_id` entropy relative to truly random batches, and the ratio to tiledbsoma-ml. The last
line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

BATCH = 256
ML_IO = 65536  # tiledbsoma-ml's default io_batch_size
ML_IO_SMALL = 16384  # a tiledbsoma-ml I/O batch whose peak RSS is near our 4 GB budget
DEFAULT_CACHE = Path(os.environ.get("ATLASLDM_CACHE", Path.home() / ".cache" / "atlasldm"))


def batch_entropy(codes: np.ndarray) -> float:
    """Shannon entropy (nats) of the label distribution within one batch."""
    counts = np.bincount(codes)
    p = counts[counts > 0] / len(codes)
    return float(-(p * np.log(p)).sum())


def random_entropy(codes: np.ndarray, batch: int, draws: int = 400, seed: int = 0) -> float:
    """Mean per-batch entropy of truly random batches (uniform without replacement)."""
    rng = np.random.default_rng(seed)
    return float(
        np.mean([batch_entropy(rng.choice(codes, batch, replace=False)) for _ in range(draws)])
    )


def _ml_batches(
    uri: str, seed: int, io_batch: int, sparse: bool
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (cells, nnz, dataset codes) per tiledbsoma-ml mini-batch (nnz -1 when dense)."""
    import tiledbsoma
    from tiledbsoma_ml import ExperimentDataset

    exp = tiledbsoma.Experiment.open(uri)
    query = exp.axis_query("RNA")
    ds = ExperimentDataset(
        query, layer_name="raw", obs_column_names=["dataset_id"], batch_size=BATCH,
        io_batch_size=io_batch, shuffle=True, shuffle_chunk_size=64, seed=seed,
        return_sparse_X=sparse,
    )  # fmt: skip
    vocab: dict[str, int] = {}
    for X, obs in ds:
        codes = np.array([vocab.setdefault(v, len(vocab)) for v in obs["dataset_id"]])
        # Counting a dense batch's nonzeros would be timed work tiledbsoma-ml never does.
        yield X.shape[0], (X.nnz if sparse else -1), codes


def _our_stream(uri: str, mode: str, vocab: str, seed: int, threads: int, row_store="auto"):
    from atlasldm.data.config import DataConfig
    from atlasldm.data.stream import CellStream

    cfg = DataConfig(
        source=uri, mode=mode, vocab_path=vocab if mode == "direct" else "",
        condition_columns=["dataset_id"], micro_batch=BATCH, seed=seed, reader_threads=threads,
        unknown_genes="drop", row_store=row_store,
    )  # fmt: skip
    return CellStream(cfg, split="all", rank=0, world_size=1)


def _our_batches(uri: str, mode: str, vocab: str, seed: int, threads: int, row_store: str):
    stream = _our_stream(uri, mode, vocab, seed, threads, row_store)
    try:
        for b in stream:
            yield b.num_cells, b.num_tokens, b.conditions[:, 0].numpy()
    finally:  # stop prefetching before the resume timings
        stream.close()


def _resume_latency(uri, mode, vocab, seed, threads, row_store) -> list[float]:
    """Seconds from constructing a stream and restoring a mid-epoch state to its first batch."""
    probe = _our_stream(uri, mode, vocab, seed, threads, row_store)
    n, state = len(probe), probe.state_dict()
    probe.close()
    latencies = []
    for frac in (0.05, 0.37, 0.71, 0.98):
        t0 = time.perf_counter()
        stream = _our_stream(uri, mode, vocab, seed, threads, row_store)
        stream.load_state_dict({**state, "batch_in_epoch": int(frac * (n - 1))})
        next(iter(stream))
        latencies.append(time.perf_counter() - t0)
        stream.close()
    return latencies


def peak_rss_gb() -> float:
    """This process's peak RSS in GiB: VmHWM of its own address space.

    getrusage's ru_maxrss survives fork and exec, so a worker started by a parent that once held
    more memory (e.g. while building a row store) would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_worker(args: argparse.Namespace) -> dict:
    """Time one loader on one experiment; returns its figures (run in a fresh process)."""
    import atlasldm.data.stream  # noqa: F401  (torch and TileDB imports are not the loader's start-up)

    if args.loader == "ml":
        batches = _ml_batches(args.uri, args.seed, args.io_batch, not args.dense)
    else:
        batches = _our_batches(
            args.uri, args.mode, args.vocab, args.seed, args.threads, args.row_store
        )
    cells = nnz = 0
    entropies: list[float] = []
    t_start = time.perf_counter()
    t_warm = cpu_warm = None
    for n_cells, n_nnz, codes in batches:
        if t_warm is None:  # the first batch pays start-up; time the steady state after it
            t_warm, cpu_warm = time.perf_counter(), time.process_time()
        else:
            cells, nnz = cells + n_cells, nnz + n_nnz
        entropies.append(batch_entropy(codes))
        if cells >= args.max_cells or time.perf_counter() - t_warm > args.seconds:
            break
    wall, cpu = time.perf_counter() - t_warm, time.process_time() - cpu_warm
    batches.close()
    nnz = max(nnz, 0)  # dense runs: the caller fills nnz/s from the sparse run's nnz per cell
    out = {
        "cells": cells, "nnz": nnz, "seconds": wall, "cells_per_s": cells / wall,
        "nnz_per_cpu_s": nnz / cpu, "cpu_seconds": cpu, "first_batch_s": t_warm - t_start,
        "entropy": float(np.mean(entropies)),
        "peak_rss_gb": peak_rss_gb(),
    }  # fmt: skip
    if args.loader == "ours":
        out["resume_first_batch_s"] = _resume_latency(
            args.uri, args.mode, args.vocab, args.seed, args.threads, args.row_store
        )
    return out


def _spawn(
    loader: str,
    uri: str,
    mode: str,
    vocab: str,
    opts: argparse.Namespace,
    io_batch: int = ML_IO,
    dense: bool = False,
    row_store: str = "auto",
) -> dict:
    cmd = [
        sys.executable, "-m", "atlasldm.data.benchmark", "worker", "--loader", loader, "--uri", uri,
        "--mode", mode, "--vocab", vocab, "--seconds", str(opts.seconds),
        "--max-cells", str(opts.max_cells), "--threads", str(opts.threads),
        "--io-batch", str(io_batch), *(["--dense"] if dense else []), "--row-store", row_store,
    ]  # fmt: skip
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
        argv = ["--source", census_uri, "--out", str(copy), "--conditions", "dataset_id",
                "cell_type", "--resume"]  # fmt: skip
        if ingest.main(argv) != 0:
            raise RuntimeError(f"ingest failed: {argv}")
    return census_uri, copy


def _dataset_codes(uri: str) -> np.ndarray:
    import tiledbsoma

    with tiledbsoma.Experiment.open(uri) as exp:
        col = exp.obs.read(column_names=["dataset_id"]).concat()["dataset_id"].to_numpy()
    return np.unique(col.astype(str), return_inverse=True)[1]


def run_benchmark(opts: argparse.Namespace) -> dict:
    """Run both cases for both loaders; print a table; return the summary."""
    census_uri, copy = build_datasets(Path(opts.cache), opts.cells, opts.genes, opts.datasets)
    vocab = str(copy / "genes.tsv")
    rand = random_entropy(_dataset_codes(census_uri), BATCH)
    cases = {
        "a_census_layout": (census_uri, "direct"),
        "b_training_copy": (str(copy / "experiment"), "copy"),
    }
    summary: dict = {"cells": opts.cells, "genes": opts.genes, "batch": BATCH,
                     "random_batch_entropy": rand, "cases": {}}  # fmt: skip
    for case, (uri, mode) in cases.items():
        ml_dense = _spawn("ml", uri, mode, vocab, opts, dense=True)
        ml = _spawn("ml", uri, mode, vocab, opts)
        ml_small = _spawn("ml", uri, mode, vocab, opts, ML_IO_SMALL)
        ours = _spawn("ours", str(copy) if mode == "copy" else uri, mode, vocab, opts)
        extra = ()
        if mode == "copy":  # the same copy read through TileDB instead of its row store
            tiledb = _spawn("ours", str(copy), mode, vocab, opts, row_store="off")
            extra = (("atlasldm, TileDB read", tiledb),)
        nnz_per_cell = ml["nnz"] / ml["cells"]
        ml_dense["nnz_per_cpu_s"] = ml_dense["nnz_per_cpu_s"] or (
            nnz_per_cell * ml_dense["cells"] / ml_dense["cpu_seconds"]
        )
        runs = (
            ("ml default(dense)", ml_dense), ("ml sparse", ml),
            (f"ml sparse io={ML_IO_SMALL}", ml_small), *extra, ("atlasldm", ours),
        )  # fmt: skip
        for name, r in runs:
            r["diversity_vs_random"] = r["entropy"] / rand
            print(
                f"{case:16s} {name:22s} {r['cells_per_s']:8.0f} cells/s "
                f"{r['nnz_per_cpu_s'] / 1e6:6.2f} M nnz/cpu-s  rss {r['peak_rss_gb']:.2f} GB  "
                f"diversity {r['diversity_vs_random']:.3f}",
                flush=True,
            )
        ratios = {name: ours["cells_per_s"] / r["cells_per_s"] for name, r in runs[:3]}
        print(
            f"{case:16s} atlasldm speed-up: "
            + ", ".join(f"{v:.2f}x vs {k}" for k, v in ratios.items()),
            flush=True,
        )
        summary["cases"][case] = {
            "tiledbsoma_ml_default_dense": ml_dense, "tiledbsoma_ml_sparse": ml,
            "tiledbsoma_ml_sparse_small_io": ml_small, "atlasldm": ours,
            "speedup_vs_default_dense": ratios["ml default(dense)"],
            "speedup_vs_sparse": ratios["ml sparse"],
            "speedup_vs_sparse_small_io": ratios[f"ml sparse io={ML_IO_SMALL}"],
        }  # fmt: skip
        if extra:
            summary["cases"][case]["atlasldm_tiledb_read"] = extra[0][1]
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Options of `launchers/bench_loader.py` (all have defaults: no arguments needed)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    for name in ("run", "worker"):
        q = sub.add_parser(name)
        q.add_argument("--seconds", type=float, default=60.0, help="max timed seconds per run")
        q.add_argument("--max-cells", type=int, default=200_000, help="max timed cells per run")
        q.add_argument("--threads", type=int, default=2, help="our reader threads per rank")
    run = sub.choices["run"]
    run.add_argument("--cells", type=int, default=500_000)
    run.add_argument("--genes", type=int, default=20_000)
    run.add_argument("--datasets", type=int, default=30)
    run.add_argument("--cache", default=str(DEFAULT_CACHE / "bench"))
    worker = sub.choices["worker"]
    worker.add_argument("--loader", choices=["ml", "ours"], required=True)
    worker.add_argument("--uri", required=True)
    worker.add_argument("--mode", choices=["direct", "copy"], required=True)
    worker.add_argument("--vocab", default="")
    worker.add_argument("--seed", type=int, default=0)
    worker.add_argument("--io-batch", type=int, default=ML_IO, help="tiledbsoma-ml io_batch_size")
    worker.add_argument("--dense", action="store_true", help="tiledbsoma-ml dense X (default)")
    worker.add_argument("--row-store", choices=["auto", "off"], default="auto")
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

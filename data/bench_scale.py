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
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.config import DataConfig
from data.sampler import LockstepSampler

DEFAULT_CACHE = "/tmp/atlasldm_bench_scale"
MODES = ("copy", "direct")
RANDOM_DRAWS = 2000  # random batches per batch size for the random-entropy reference


# ----------------------------------------------------------------------------------------------
# Entropy and diversity (vectorised)


def batch_entropies(labels: np.ndarray, sizes: np.ndarray, n_labels: int) -> np.ndarray:
    """Shannon entropy (nats) of the labels in each batch; `labels` in emission order.

    Batch i holds labels[sum(sizes[:i]) : sum(sizes[:i+1])]; equals data.benchmark.batch_entropy
    batch by batch (0 for an empty batch).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    nb = len(sizes)
    if nb == 0:
        return np.zeros(0)
    batch = np.repeat(np.arange(nb, dtype=np.int64), sizes)
    counts = np.bincount(batch * n_labels + labels, minlength=nb * n_labels).reshape(nb, n_labels)
    p = counts / np.maximum(sizes, 1)[:, None]
    return -(p * np.log(np.where(counts > 0, p, 1.0))).sum(axis=1)


class RandomEntropy:
    """Mean per-batch entropy of uniformly random batches (without replacement), by batch size.

    Draws are multivariate-hypergeometric label counts from the population's label counts, the
    same distribution as data.benchmark.random_entropy's `rng.choice(codes, b, replace=False)`.
    """

    def __init__(self, label_counts: np.ndarray, draws: int = RANDOM_DRAWS, seed: int = 0):
        self.counts = np.asarray(label_counts, dtype=np.int64)
        self.draws, self.seed = draws, seed
        self._cache: dict[int, float] = {}

    def __call__(self, size: int) -> float:
        """Return the expected entropy of a random batch of `size` cells (nats)."""
        size = int(min(size, self.counts.sum()))
        if size not in self._cache:
            rng = np.random.default_rng([self.seed, size])
            draws = rng.multivariate_hypergeometric(self.counts, size, size=self.draws)
            sizes = np.full(self.draws, size, dtype=np.int64)
            labels = np.repeat(np.tile(np.arange(len(self.counts)), self.draws), draws.ravel())
            self._cache[size] = float(batch_entropies(labels, sizes, len(self.counts)).mean())
        return self._cache[size]

    def ratios(self, entropies: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Per-batch entropy / random entropy of the same size (batches where it is > 0)."""
        ref = np.array([self(s) for s in sizes]) if len(sizes) else np.zeros(0)
        ok = ref > 0
        return np.asarray(entropies)[ok] / ref[ok]


# ----------------------------------------------------------------------------------------------
# Part 1: sampler sweep


def census_labels(n: int, datasets: int, seed: int = 0, alpha: float = 1.0) -> np.ndarray:
    """Dataset label per row, Census layout: `datasets` contiguous blocks of random sizes.

    Sizes are Dirichlet(alpha) shares of n (alpha 1: very unequal, as in Census), each >= 1.
    """
    rng = np.random.default_rng([seed, n, datasets])
    weights = rng.dirichlet(np.full(datasets, alpha))
    sizes = np.maximum(1, np.floor(weights * (n - datasets)).astype(np.int64))
    sizes[np.argmax(sizes)] += n - sizes.sum()
    return np.repeat(np.arange(datasets, dtype=np.int64), sizes)


def mode_labels(census: np.ndarray, mode: str, seed: int = 0) -> np.ndarray:
    """Labels in the stream's row order: contiguous (direct) or pre-permuted at ingest (copy)."""
    if mode == "direct":
        return census
    return np.random.default_rng([seed, len(census), 1]).permutation(census)


def evaluated_ranks(world_size: int, max_ranks: int) -> np.ndarray:
    """At most `max_ranks` ranks of `world_size`, evenly spread, always including 0 and W-1."""
    k = min(world_size, max(1, max_ranks))
    return np.unique(np.linspace(0, world_size - 1, k).round().astype(np.int64))


def _tv(counts: np.ndarray) -> np.ndarray:
    """Total-variation distance of each row's label mix from the mix of all rows together."""
    glob = counts.sum(axis=0) / max(counts.sum(), 1)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return 0.5 * np.abs(rows - glob).sum(axis=1)


def random_split_tv(labels: np.ndarray, world_size: int, seed: int = 0) -> float:
    """Max over parts of the epoch-mix TV of a uniformly random split into W near-equal parts."""
    n, d = len(labels), int(labels.max()) + 1
    perm = np.random.default_rng([seed, n, world_size, 2]).permutation(labels)
    part = (np.arange(n, dtype=np.int64) * world_size) // n
    counts = np.bincount(part * d + perm, minlength=world_size * d).reshape(world_size, d)
    return float(_tv(counts).max())


def sweep_config(
    labels: np.ndarray,
    cfg: DataConfig,
    world_size: int,
    mean_nnz: float,
    max_eval_ranks: int,
    rand: RandomEntropy,
) -> dict[str, Any]:
    """Check one (mode, N, W): every rank's epoch-0 plans, as the stream would build them."""
    from data.stream import stream_layout

    t0 = time.perf_counter()
    n, d = len(labels), len(rand.counts)
    C, K = stream_layout(cfg, n, world_size, mean_nnz)
    evaluated = set(evaluated_ranks(world_size, max_eval_ranks).tolist())
    all_rows: list[np.ndarray] = []
    out_of_range = 0
    declared, emitted, sizes_per_rank = [], [], []
    mix = np.zeros((world_size, d), dtype=np.int64)
    div_rank: list[float] = []
    div_all: list[np.ndarray] = []
    for r in range(world_size):
        sampler = LockstepSampler(n, C, K, cfg.micro_batch, world_size, r, cfg.seed, cfg.drop_last)
        declared.append(int(sampler.num_batches()))  # default: the whole epoch
        plans = list(sampler.rounds(0))
        rows = np.concatenate([np.asarray(p.rows, dtype=np.int64) for p in plans] or [[]])
        rows = rows.astype(np.int64)
        sizes = np.concatenate([np.asarray(p.batch_sizes, np.int64) for p in plans] or [[]])
        sizes = sizes.astype(np.int64)
        emitted.append(len(sizes))
        sizes_per_rank.append(sizes)
        if int(sizes.sum()) != len(rows):
            raise ValueError(f"rank {r}: batch sizes sum to {sizes.sum()} != {len(rows)} rows")
        bad = (rows < 0) | (rows >= n)
        out_of_range += int(bad.sum())
        rows = rows[~bad]
        all_rows.append(rows)
        mix[r] = np.bincount(labels[rows], minlength=d)
        if r in evaluated and not bad.any():
            ratios = rand.ratios(batch_entropies(labels[rows], sizes, d), sizes)
            div_all.append(ratios)
            if len(ratios):
                div_rank.append(float(ratios.mean()))
    seen = np.bincount(np.concatenate(all_rows), minlength=n) if all_rows else np.zeros(n)
    duplicates = int((seen > 1).sum())
    missing = int((seen == 0).sum())
    exactly_once = duplicates == 0 and missing == 0 and out_of_range == 0
    counts_equal = len(set(declared)) == 1 and declared == emitted
    all_sizes = np.concatenate(sizes_per_rank) if sizes_per_rank else np.zeros(0, np.int64)
    spread = 0
    if counts_equal and declared[0] > 0:
        grid = np.stack(sizes_per_rank)  # (W, batches): lockstep sizes, column by column
        spread = int((grid.max(axis=0) - grid.min(axis=0)).max())
    balanced = counts_equal and (cfg.drop_last or spread <= 1)
    divs = np.concatenate(div_all) if div_all else np.zeros(0)
    tv = _tv(mix)
    return {
        "mode": cfg.mode, "N": n, "W": world_size, "C": int(C), "K": int(K),
        "micro_batch": cfg.micro_batch, "ranks_evaluated": len(evaluated),
        "exactly_once": bool(exactly_once), "duplicate_rows": duplicates,
        "missing_rows": missing, "out_of_range_rows": out_of_range,
        "balanced": bool(balanced), "num_batches": declared[0],
        "num_batches_min": min(declared), "num_batches_max": max(declared),
        "emitted_batches_min": min(emitted), "emitted_batches_max": max(emitted),
        "batch_size_min": int(all_sizes.min()) if len(all_sizes) else 0,
        "batch_size_max": int(all_sizes.max()) if len(all_sizes) else 0,
        "full_batches_fraction": float((all_sizes == cfg.micro_batch).mean())
        if len(all_sizes) else 0.0,
        "batch_size_spread_across_ranks": spread,
        "diversity_mean": float(divs.mean()) if len(divs) else None,
        "diversity_worst_rank": min(div_rank) if div_rank else None,
        "diversity_worst_batch": float(divs.min()) if len(divs) else None,
        "epoch_mix_tv_max": float(tv.max()),
        "epoch_mix_tv_random_split_max": random_split_tv(labels, world_size, cfg.seed),
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def world_sizes(max_world_size: int) -> list[int]:
    """1, 2, 4, ... up to max_world_size (inclusive when a power of two)."""
    out, w = [], 1
    while w <= max_world_size:
        out.append(w)
        w *= 2
    return out


def run_sweep(opts: argparse.Namespace) -> dict[str, Any]:
    """Part 1: every (N, mode, W); prints one line per configuration."""
    rows = []
    for n in opts.sweep_cells:
        census = census_labels(n, opts.datasets, opts.seed)
        rand = RandomEntropy(np.bincount(census, minlength=opts.datasets), seed=opts.seed)
        for mode in opts.modes:
            labels = mode_labels(census, mode, opts.seed)
            cfg = _data_config(opts, mode)
            for w in world_sizes(opts.max_world_size):
                row = sweep_config(labels, cfg, w, opts.mean_nnz, opts.max_eval_ranks, rand)
                rows.append(row)
                print(
                    f"sweep {mode:6s} N={n:>9,} W={w:>5} C={row['C']} K={row['K']:>3} "
                    f"once={row['exactly_once']!s:5s} balanced={row['balanced']!s:5s} "
                    f"batches={row['num_batches']} size {row['batch_size_min']}-"
                    f"{row['batch_size_max']} diversity {_fmt(row['diversity_mean'])} "
                    f"(worst rank {_fmt(row['diversity_worst_rank'])}) "
                    f"tv {row['epoch_mix_tv_max']:.4f} "
                    f"(random {row['epoch_mix_tv_random_split_max']:.4f}) {row['seconds']:.2f} s",
                    flush=True,
                )
    return {
        "label_layout": f"{opts.datasets} contiguous datasets, Dirichlet(1) sizes, "
        f"seed {opts.seed}",
        "mean_nnz": opts.mean_nnz,
        "configs": rows,
        "exactly_once": all(r["exactly_once"] for r in rows),
        "balanced": all(r["balanced"] for r in rows),
    }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _data_config(opts: argparse.Namespace, mode: str, **kw: Any) -> DataConfig:
    return DataConfig(
        mode=mode, micro_batch=opts.micro_batch, seed=opts.seed,
        memory_budget_gb=opts.memory_budget_gb, **kw,
    )  # fmt: skip


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
    from data import ingest
    from data.synthetic import write_synthetic_experiment

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
    from data.rowstore import has_row_store

    return {"census": str(census), "copy": str(training) if have_copy else None,
            "row_store": have_copy and has_row_store(training),
            "vocab": str(vocab), **info}  # fmt: skip


def _write_vocab(census_uri: str, path: Path) -> None:
    """genes.tsv of the experiment's var (feature_id, feature_name), for direct mode."""
    import tiledbsoma

    from data.vocab import GeneVocab

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


def disk_bytes(path: str | Path) -> int:
    """Bytes a folder (or file) takes on disk (allocated blocks), 0 when absent."""
    path = Path(path)
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # a file removed while walking
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


# ----------------------------------------------------------------------------------------------
# Measured processes (workers)


def proc_memory() -> dict[str, float]:
    """VmHWM (peak RSS), VmRSS, RssAnon and RssFile of this process, GiB."""
    out: dict[str, float] = {}
    keys = {"VmHWM:": "peak_rss_gb", "VmRSS:": "rss_gb", "RssAnon:": "rss_anon_gb",
            "RssFile:": "rss_file_gb"}  # fmt: skip
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0] + ":"
            if key in keys:
                out[keys[key]] = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return out


def _stream_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(
        source=args.source, mode=args.mode,
        vocab_path=args.vocab if args.mode == "direct" else "",
        condition_columns=["dataset_id"], micro_batch=args.micro_batch, seed=args.seed,
        reader_threads=args.threads, memory_budget_gb=args.memory_budget_gb,
    )  # fmt: skip


def _barrier(folder: str, rank: int, world_size: int, timeout: float = 900.0) -> None:
    """Wait until every rank has written its ready file in `folder`."""
    Path(folder, f"ready_{rank}").write_text("")
    deadline = time.monotonic() + timeout
    while sum(Path(folder, f"ready_{r}").exists() for r in range(world_size)) < world_size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks did not all start within {timeout} s")
        time.sleep(0.01)


def worker_time(args: argparse.Namespace) -> dict[str, Any]:
    """One rank of a timing run: construct, barrier, iterate up to max cells / seconds."""
    from data.stream import CellStream

    t0, c0 = time.perf_counter(), time.process_time()
    stream = CellStream(_stream_config(args), args.split, rank=args.rank,
                        world_size=args.world_size)  # fmt: skip
    construct_s = time.perf_counter() - t0
    if args.barrier:
        _barrier(args.barrier, args.rank, args.world_size)
    rand = RandomEntropy(np.array(json.loads(args.label_counts)), seed=args.seed)
    t_start = time.perf_counter()
    t_warm = cpu_warm = None
    cells = nnz = batches = 0
    ratios: list[float] = []
    n_labels = len(rand.counts) + 1  # + the null code
    for batch in _epochs(stream, args.epochs):
        if t_warm is None:  # the first batch pays the first round's read; time the rest
            t_warm, cpu_warm = time.perf_counter(), time.process_time()
            first_batch_s, wall_start = t_warm - t_start, time.time()
        else:
            cells, nnz, batches = cells + batch.num_cells, nnz + batch.num_tokens, batches + 1
        codes = batch.conditions[:, 0].numpy()
        size = np.array([len(codes)])
        ratios.extend(rand.ratios(batch_entropies(codes, size, n_labels), size).tolist())
        over = args.max_cells and cells >= args.max_cells
        if over or time.perf_counter() - t_warm > args.seconds:
            break
    wall = time.perf_counter() - (t_warm or t_start)
    cpu = time.process_time() - (cpu_warm or c0)
    wall_end = time.time()
    stream.close()
    return {
        "rank": args.rank, "world_size": args.world_size, "construct_s": construct_s,
        "first_batch_s": first_batch_s if t_warm else None, "cells": cells, "nnz": nnz,
        "batches": batches, "seconds": wall, "cells_per_s": cells / wall if wall > 0 else 0.0,
        "timed_from": wall_start if t_warm else None, "timed_to": wall_end,
        "cpu_seconds": cpu, "cpu_seconds_total": time.process_time() - c0,
        "diversity": float(np.mean(ratios)) if ratios else None, "batches_per_epoch": len(stream),
        **proc_memory(),
    }  # fmt: skip


def _epochs(stream: Any, epochs: int) -> Any:
    """Yield the stream's batches of `epochs` consecutive epochs."""
    for _ in range(epochs):
        yield from stream


def worker_flat(args: argparse.Namespace) -> dict[str, Any]:
    """Fresh-process measures of one stream: start-up and steady memory, or a resume."""
    from data.stream import CellStream

    cfg = _stream_config(args)
    t0 = time.perf_counter()
    stream = CellStream(cfg, args.split, rank=0, world_size=1)
    construct_s = time.perf_counter() - t0
    mem_constructed = proc_memory()
    out: dict[str, Any] = {"construct_s": construct_s, "batches_per_epoch": len(stream),
                           "constructed_rss_gb": mem_constructed.get("rss_gb")}  # fmt: skip
    state_file = Path(args.state_file)
    if args.phase == "resume":
        state = json.loads(state_file.read_text())
        t1 = time.perf_counter()
        stream.load_state_dict(state["state"])
        batch = next(iter(stream))
        t2 = time.perf_counter()
        ids = batch.soma_joinid[:16].tolist()
        stream.close()
        return {**out, "load_to_first_batch_s": t2 - t1, "resume_total_s": t2 - t0,
                "resume_matches": ids == state["next_joinids"], **proc_memory()}  # fmt: skip
    it = iter(stream)
    next(it)
    out["startup_s"] = time.perf_counter() - t0  # construction to first batch
    done = 1
    for _ in range(args.batches):
        if next(it, None) is None:
            break
        done += 1
    out["steady_batches"] = done
    out.update(proc_memory())  # peak RSS after start-up and `batches` steady batches
    # Walk to mid-epoch through the public API, save the position and the next batch's cells.
    t1 = time.perf_counter()
    mid = len(stream) // 2
    while done < mid and next(it, None) is not None:
        done += 1
    out["walk_to_mid_s"] = time.perf_counter() - t1
    state = stream.state_dict()
    text = json.dumps(state)
    nxt = next(it, None)
    half = proc_memory()  # file-backed pages of the row store count in RSS (RssFile)
    out.update(
        mid_batch=done,
        state_dict_chars=len(text),
        half_epoch_peak_rss_gb=half.get("peak_rss_gb"),
        half_epoch_rss_anon_gb=half.get("rss_anon_gb"),
        half_epoch_rss_file_gb=half.get("rss_file_gb"),
    )
    stream.close()
    next_ids = [] if nxt is None else nxt.soma_joinid[:16].tolist()
    state_file.write_text(json.dumps({"state": state, "next_joinids": next_ids}))
    return out


def _worker_argv(kind: str, mode: str, source: str, vocab: str, opts: argparse.Namespace,
                 **extra: Any) -> list[str]:  # fmt: skip
    argv = [kind, "--mode", mode, "--source", source, "--vocab", vocab,
            "--micro-batch", str(opts.micro_batch), "--seed", str(opts.seed),
            "--threads", str(opts.threads), "--memory-budget-gb", str(opts.memory_budget_gb),
            "--split", opts.split]  # fmt: skip
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def _run_workers(argvs: list[list[str]], inline: bool) -> list[dict[str, Any]]:
    """Run worker command lines together (fresh processes), or one by one in this process."""
    if inline:
        return [_dispatch(build_parser().parse_args(a)) for a in argvs]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "data.bench_scale", *a],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for a in argvs
    ]
    results = []
    for p, a in zip(procs, argvs, strict=True):
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"worker failed: {' '.join(a)}\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


# ----------------------------------------------------------------------------------------------
# Parts 2 and 3


def _sources(corpus: dict, mode: str) -> tuple[str, str] | None:
    """(source, vocab) of a corpus for a mode, or None when it has no such source."""
    if mode == "copy":
        return (corpus["copy"], "") if corpus.get("copy") else None
    return corpus["census"], corpus["vocab"]


def run_timing(opts: argparse.Namespace, corpus: dict, stats: dict) -> dict[str, Any]:
    """Part 2: W ranks as processes started together, per mode."""
    import tempfile

    counts = json.dumps(stats["dataset_counts"])
    runs = []
    for mode in opts.modes:
        src = _sources(corpus, mode)
        if src is None:
            continue
        for w in opts.timing_world_sizes:
            with tempfile.TemporaryDirectory(prefix="bench_scale_barrier_") as barrier:
                argvs = [
                    _worker_argv("worker-time", mode, *src, opts, rank=r, world_size=w,
                                 epochs=opts.epochs, max_cells=opts.max_cells,
                                 seconds=opts.seconds,
                                 label_counts=counts, barrier="" if opts.inline else barrier)
                    for r in range(w)
                ]  # fmt: skip
                t0 = time.perf_counter()
                ranks = _run_workers(argvs, opts.inline)
                wall = time.perf_counter() - t0
            starts = [r["timed_from"] for r in ranks if r["timed_from"] is not None]
            span = max(r["timed_to"] for r in ranks) - min(starts) if starts else 0.0
            total_cells = sum(r["cells"] for r in ranks)
            run = {
                "mode": mode, "W": w, "wall_s": wall, "ranks": ranks,
                "cells_per_s_per_rank": [r["cells_per_s"] for r in ranks],
                # all ranks' timed cells over the union of their timed windows
                "cells_per_s_total": total_cells / span if span > 0 else 0.0,
                "timed_span_s": span,
                "cpu_seconds": [r["cpu_seconds"] for r in ranks],
                "peak_rss_gb": [r.get("peak_rss_gb") for r in ranks],
                "diversity": [r["diversity"] for r in ranks],
            }  # fmt: skip
            runs.append(run)
            print(
                f"timing {mode:6s} W={w}: {run['cells_per_s_total']:,.0f} cells/s total; per "
                f"rank {', '.join(f'{x:,.0f}' for x in run['cells_per_s_per_rank'])}; cpu-s "
                f"{', '.join(f'{x:.1f}' for x in run['cpu_seconds'])}; peak RSS "
                f"{', '.join(f'{x or 0:.2f}' for x in run['peak_rss_gb'])} GiB; diversity "
                f"{', '.join(_fmt(x) for x in run['diversity'])}",
                flush=True,
            )
    return {"cells": stats["cells"], "genes": opts.genes, "mean_nnz": stats["mean_nnz"],
            "cpu_count": os.cpu_count(), "runs": runs}  # fmt: skip


def run_flat(opts: argparse.Namespace, corpora: dict[int, dict]) -> dict[str, Any]:
    """Part 3: one rank per corpus size and mode, each measure from fresh processes."""
    import tempfile

    sizes = sorted(corpora)
    per: dict[str, dict[int, dict]] = {m: {} for m in opts.modes}
    for n in sizes:
        for mode in opts.modes:
            src = _sources(corpora[n], mode)
            if src is None:
                print(f"flat   {mode:6s} N={n:,}: no training copy, skipped", flush=True)
                continue
            with tempfile.TemporaryDirectory(prefix="bench_scale_state_") as tmp:
                state = str(Path(tmp) / "state.json")
                common = dict(state_file=state, batches=opts.flat_batches)
                (start,) = _run_workers(
                    [_worker_argv("worker-flat", mode, *src, opts, phase="start", **common)],
                    opts.inline,
                )
                (resume,) = _run_workers(
                    [_worker_argv("worker-flat", mode, *src, opts, phase="resume", **common)],
                    opts.inline,
                )
            row = {
                "peak_rss_gb": start.get("peak_rss_gb"), "rss_anon_gb": start.get("rss_anon_gb"),
                "rss_file_gb": start.get("rss_file_gb"),
                "constructed_rss_gb": start.get("constructed_rss_gb"),
                "construct_s": start["construct_s"], "startup_s": start["startup_s"],
                "resume_construct_s": resume["construct_s"],
                "resume_first_batch_s": resume["load_to_first_batch_s"],
                "resume_total_s": resume["resume_total_s"],
                "resume_matches": resume["resume_matches"],
                "resume_peak_rss_gb": resume.get("peak_rss_gb"),
                "state_dict_chars": start["state_dict_chars"],
                "batches_per_epoch": start["batches_per_epoch"], "mid_batch": start["mid_batch"],
                "walk_to_mid_s": start["walk_to_mid_s"],
                "half_epoch_peak_rss_gb": start["half_epoch_peak_rss_gb"],
                "half_epoch_rss_anon_gb": start.get("half_epoch_rss_anon_gb"),
                "half_epoch_rss_file_gb": start.get("half_epoch_rss_file_gb"),
                "steady_batches": start["steady_batches"],
            }  # fmt: skip
            per[mode][n] = row
            print(
                f"flat   {mode:6s} N={n:>9,}: peak RSS {row['peak_rss_gb'] or 0:.2f} GiB "
                f"(anon {row['rss_anon_gb'] or 0:.2f}, file {row['rss_file_gb'] or 0:.2f}), "
                f"start-up {row['startup_s']:.2f} s (construct {row['construct_s']:.2f}), "
                f"resume first batch {row['resume_first_batch_s']:.2f} s (+construct "
                f"{row['resume_construct_s']:.2f}), state {row['state_dict_chars']} chars, "
                f"resume matches {row['resume_matches']}",
                flush=True,
            )
    keys = ("peak_rss_gb", "rss_anon_gb", "constructed_rss_gb", "startup_s", "construct_s",
            "resume_first_batch_s", "resume_total_s", "state_dict_chars")  # fmt: skip
    ratios = {}
    for mode, rows in per.items():
        if len(rows) >= 2:
            lo, hi = rows[min(rows)], rows[max(rows)]
            ratios[mode] = {
                "cells": f"{max(rows)}/{min(rows)}",
                **{k: (hi[k] / lo[k] if lo.get(k) else None) for k in keys},
            }
            print(
                f"flat   {mode:6s} ratio {ratios[mode]['cells']}: "
                + ", ".join(f"{k} {_fmt(v)}" for k, v in ratios[mode].items() if k != "cells"),
                flush=True,
            )
    disk = {
        str(n): {
            "census_layout_bytes": disk_bytes(c["census"]),
            "training_copy_bytes": disk_bytes(c["copy"]) if c.get("copy") else 0,
            "row_store_bytes": disk_bytes(Path(c["copy"]) / "rows") if c.get("copy") else 0,
            "ingest_leftovers_bytes": (disk_bytes(Path(c["copy"]) / ".progress")
                                       + disk_bytes(Path(c["copy"]) / ".staging"))
            if c.get("copy") else 0,
            "generate_s": c.get("generate_s"), "ingest_s": c.get("ingest_s"),
        }
        for n, c in corpora.items()
    }  # fmt: skip
    return {
        "modes": {m: {str(n): r for n, r in rows.items()} for m, rows in per.items()},
        "ratio_largest_to_smallest": ratios,
        "disk": disk,
        "copy_skipped_cells": [n for n in sizes if not corpora[n].get("copy")],
    }


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
    if opts.command == "worker-time":
        return worker_time(opts)
    if opts.command == "worker-flat":
        return worker_flat(opts)
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

"""Parts 2 and 3 of the scale benchmark (:mod:`atlasldm.bench.scale`): measured stream processes.

Timing (W ranks as concurrent processes behind a file barrier) and flatness in N (one rank per
corpus size in fresh processes: peak RSS, start-up, mid-epoch resume). The processes are
:mod:`atlasldm.bench.scale_workers`, started as `python -m atlasldm.bench.scale
worker-time|worker-flat ...`, or run in this process (`--inline`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from atlasldm.bench.diversity import fmt_or_na
from atlasldm.bench.scale_cli import parse_args
from atlasldm.bench.scale_workers import run_worker

# Figures of the flat part compared between the largest and the smallest corpus.
RATIO_KEYS = (
    "peak_rss_gb",
    "half_epoch_peak_rss_gb",
    "rss_anon_gb",
    "constructed_rss_gb",
    "startup_s",
    "construct_s",
    "resume_first_batch_s",
    "resume_total_s",
    "state_dict_chars",
)


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


def worker_argv(
    kind: str, src: tuple[str, str, str], opts: argparse.Namespace, extra: dict
) -> list[str]:
    """Command line of one worker: `kind`, the stream `src` (mode, source, vocab), the shared
    stream options of the run, and `extra` options (`max_cells` -> `--max-cells`)."""
    mode, source, vocab = src
    flags = {"mode": mode, "source": source, "vocab": vocab, "micro_batch": opts.micro_batch}
    flags |= {"seed": opts.seed, "threads": opts.threads}
    flags |= {"memory_budget_gb": opts.memory_budget_gb, "split": opts.split}
    flags |= {"chunk_cells": opts.chunk_cells, **extra}
    argv = [kind]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def run_workers(argvs: list[list[str]], inline: bool) -> list[dict[str, Any]]:
    """Run worker command lines together (fresh processes), or one by one in this process."""
    if inline:
        return [run_worker(parse_args(a)) for a in argvs]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "atlasldm.bench.scale", *a],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for a in argvs
    ]
    results = []
    for p, a in zip(procs, argvs, strict=True):
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"worker failed: {' '.join(a)}\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def stream_source(corpus: dict, mode: str) -> tuple[str, str, str] | None:
    """(mode, source, vocab) of a corpus's stream in `mode`, or None when it has no such source."""
    if mode == "copy":
        return (mode, corpus["copy"], "") if corpus.get("copy") else None
    return mode, corpus["census"], corpus["vocab"]


# ----------------------------------------------------------------------------------------------
# Part 2: timing


def time_ranks(opts: argparse.Namespace, src: tuple[str, str, str], w: int, counts: str) -> dict:
    """One timing run: W ranks started together on one stream source; their figures."""
    extra = {"world_size": w, "epochs": opts.epochs, "max_cells": opts.max_cells}
    extra |= {"seconds": opts.seconds, "label_counts": counts}
    with tempfile.TemporaryDirectory(prefix="bench_scale_barrier_") as barrier:
        extra["barrier"] = "" if opts.inline else barrier
        argvs = [worker_argv("worker-time", src, opts, {"rank": r, **extra}) for r in range(w)]
        t0 = time.perf_counter()
        ranks = run_workers(argvs, opts.inline)
        wall = time.perf_counter() - t0
    starts = [r["timed_from"] for r in ranks if r["timed_from"] is not None]
    span = max(r["timed_to"] for r in ranks) - min(starts) if starts else 0.0
    total_cells = sum(r["cells"] for r in ranks)
    return {
        "mode": src[0],
        "W": w,
        "wall_s": wall,
        "ranks": ranks,
        "cells_per_s_per_rank": [r["cells_per_s"] for r in ranks],
        # all ranks' timed cells over the union of their timed windows
        "cells_per_s_total": total_cells / span if span > 0 else 0.0,
        "timed_span_s": span,
        "cpu_seconds": [r["cpu_seconds"] for r in ranks],
        "peak_rss_gb": [r.get("peak_rss_gb") for r in ranks],
        "diversity": [r["diversity"] for r in ranks],
    }


def print_timing(run: dict) -> None:
    """One line per timing run: total and per-rank cells/s, CPU, memory, diversity."""
    print(
        f"timing {run['mode']:6s} W={run['W']}: {run['cells_per_s_total']:,.0f} cells/s total; "
        f"per rank {', '.join(f'{x:,.0f}' for x in run['cells_per_s_per_rank'])}; cpu-s "
        f"{', '.join(f'{x:.1f}' for x in run['cpu_seconds'])}; peak RSS "
        f"{', '.join(f'{x or 0:.2f}' for x in run['peak_rss_gb'])} GiB; diversity "
        f"{', '.join(fmt_or_na(x) for x in run['diversity'])}",
        flush=True,
    )


def run_timing(opts: argparse.Namespace, corpus: dict, stats: dict) -> dict[str, Any]:
    """Part 2: W ranks as processes started together, per mode."""
    counts = json.dumps(stats["dataset_counts"])
    runs = []
    for mode in opts.modes:
        src = stream_source(corpus, mode)
        if src is None:
            continue
        for w in opts.timing_world_sizes:
            runs.append(time_ranks(opts, src, w, counts))
            print_timing(runs[-1])
    return {
        "cells": stats["cells"],
        "genes": opts.genes,
        "mean_nnz": stats["mean_nnz"],
        "cpu_count": os.cpu_count(),
        "runs": runs,
    }


# ----------------------------------------------------------------------------------------------
# Part 3: flat in N


def flat_row(opts: argparse.Namespace, src: tuple[str, str, str]) -> dict[str, Any]:
    """Start-up and steady memory in one fresh process, then a mid-epoch resume in another."""
    with tempfile.TemporaryDirectory(prefix="bench_scale_state_") as tmp:
        common = {"state_file": str(Path(tmp) / "state.json"), "batches": opts.flat_batches}
        (start,) = run_workers(
            [worker_argv("worker-flat", src, opts, {"phase": "start", **common})], opts.inline
        )
        (resume,) = run_workers(
            [worker_argv("worker-flat", src, opts, {"phase": "resume", **common})], opts.inline
        )
    row = {k: start.get(k) for k in ("peak_rss_gb", "rss_anon_gb", "rss_file_gb")}
    row["constructed_rss_gb"] = start.get("constructed_rss_gb")
    row |= {"construct_s": start["construct_s"], "startup_s": start["startup_s"]}
    row["resume_construct_s"] = resume["construct_s"]
    row["resume_first_batch_s"] = resume["load_to_first_batch_s"]
    row["resume_total_s"] = resume["resume_total_s"]
    row["resume_matches"] = resume["resume_matches"]
    row["resume_peak_rss_gb"] = resume.get("peak_rss_gb")
    for key in ("state_dict_chars", "batches_per_epoch", "mid_batch", "walk_to_mid_s"):
        row[key] = start[key]
    row["half_epoch_peak_rss_gb"] = start["half_epoch_peak_rss_gb"]
    row["half_epoch_rss_anon_gb"] = start.get("half_epoch_rss_anon_gb")
    row["half_epoch_rss_file_gb"] = start.get("half_epoch_rss_file_gb")
    row["steady_batches"] = start["steady_batches"]
    return row


def print_flat_row(mode: str, n: int, row: dict) -> None:
    """One line per corpus size and mode: memory, start-up, resume, state size."""
    print(
        f"flat   {mode:6s} N={n:>9,}: peak RSS {row['peak_rss_gb'] or 0:.2f} GiB "
        f"(anon {row['rss_anon_gb'] or 0:.2f}, file {row['rss_file_gb'] or 0:.2f}), "
        f"start-up {row['startup_s']:.2f} s (construct {row['construct_s']:.2f}), "
        f"resume first batch {row['resume_first_batch_s']:.2f} s (+construct "
        f"{row['resume_construct_s']:.2f}), state {row['state_dict_chars']} chars, "
        f"resume matches {row['resume_matches']}",
        flush=True,
    )


def flat_ratios(per: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per mode with two sizes or more: each RATIO_KEYS figure, largest corpus / smallest."""
    ratios = {}
    for mode, rows in per.items():
        if len(rows) < 2:
            continue
        lo, hi = rows[min(rows)], rows[max(rows)]
        ratios[mode] = {"cells": f"{max(rows)}/{min(rows)}"}
        ratios[mode] |= {k: (hi[k] / lo[k] if lo.get(k) else None) for k in RATIO_KEYS}
        figures = ", ".join(f"{k} {fmt_or_na(ratios[mode][k])}" for k in RATIO_KEYS)
        print(f"flat   {mode:6s} ratio {ratios[mode]['cells']}: {figures}", flush=True)
    return ratios


def corpus_disk(corpus: dict) -> dict[str, Any]:
    """Disk the corpus's experiment, copy, row store and ingest leftovers take; build times."""
    copy = Path(corpus["copy"]) if corpus.get("copy") else None
    leftovers = (disk_bytes(copy / ".progress") + disk_bytes(copy / ".staging")) if copy else 0
    return {
        "census_layout_bytes": disk_bytes(corpus["census"]),
        "training_copy_bytes": disk_bytes(copy) if copy else 0,
        "row_store_bytes": disk_bytes(copy / "rows") if copy else 0,
        "ingest_leftovers_bytes": leftovers,
        "generate_s": corpus.get("generate_s"),
        "ingest_s": corpus.get("ingest_s"),
    }


def run_flat(opts: argparse.Namespace, corpora: dict[int, dict]) -> dict[str, Any]:
    """Part 3: one rank per corpus size and mode, each measure from fresh processes."""
    sizes = sorted(corpora)
    per: dict[str, dict[int, dict]] = {m: {} for m in opts.modes}
    for n in sizes:
        for mode in opts.modes:
            src = stream_source(corpora[n], mode)
            if src is None:
                print(f"flat   {mode:6s} N={n:,}: no training copy, skipped", flush=True)
                continue
            per[mode][n] = flat_row(opts, src)
            print_flat_row(mode, n, per[mode][n])
    return {
        "modes": {m: {str(n): r for n, r in rows.items()} for m, rows in per.items()},
        "ratio_largest_to_smallest": flat_ratios(per),
        "disk": {str(n): corpus_disk(c) for n, c in corpora.items()},
        "copy_skipped_cells": [n for n in sizes if not corpora[n].get("copy")],
    }

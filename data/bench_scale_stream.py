"""Parts 2 and 3 of the scale benchmark (data/bench_scale.py): measured stream processes.

Timing (W ranks as concurrent processes behind a file barrier) and flatness in N (one rank per
corpus size in fresh processes: peak RSS, start-up, mid-epoch resume). Workers are started as
`python -m atlasldm.data.bench_scale worker-time|worker-flat ...`, or run in this process
(`--inline`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from atlasldm.data.bench_scale_sweep import RandomEntropy, batch_entropies, fmt_or_na
from atlasldm.data.config import DataConfig

# ----------------------------------------------------------------------------------------------
# Disk


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
        chunk_cells=args.chunk_cells,
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
    from atlasldm.data.stream import CellStream

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
    from atlasldm.data.stream import CellStream

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


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measured process a parsed `worker-time` / `worker-flat` command line names."""
    if args.command == "worker-time":
        return worker_time(args)
    return worker_flat(args)


def _worker_argv(kind: str, mode: str, source: str, vocab: str, opts: argparse.Namespace,
                 **extra: Any) -> list[str]:  # fmt: skip
    argv = [kind, "--mode", mode, "--source", source, "--vocab", vocab,
            "--micro-batch", str(opts.micro_batch), "--seed", str(opts.seed),
            "--threads", str(opts.threads), "--memory-budget-gb", str(opts.memory_budget_gb),
            "--split", opts.split, "--chunk-cells", str(opts.chunk_cells)]  # fmt: skip
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def _run_workers(argvs: list[list[str]], inline: bool) -> list[dict[str, Any]]:
    """Run worker command lines together (fresh processes), or one by one in this process."""
    if inline:
        from atlasldm.data.bench_scale import (
            build_parser,  # the CLI module; imported here, not at load
        )

        return [run_worker(build_parser().parse_args(a)) for a in argvs]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "atlasldm.data.bench_scale", *a],
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
                f"{', '.join(fmt_or_na(x) for x in run['diversity'])}",
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
    keys = ("peak_rss_gb", "half_epoch_peak_rss_gb", "rss_anon_gb", "constructed_rss_gb",
            "startup_s", "construct_s", "resume_first_batch_s", "resume_total_s",
            "state_dict_chars")  # fmt: skip
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
                + ", ".join(f"{k} {fmt_or_na(v)}" for k, v in ratios[mode].items() if k != "cells"),
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

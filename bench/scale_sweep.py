"""Part 1 of the scale benchmark (:mod:`atlasldm.bench.scale`): the pure-numpy sampler sweep.

Census-layout labels, every rank's `LockstepSampler` epoch-0 plans checked for exactly-once
coverage, step balance, per-batch dataset diversity against random batches
(:mod:`atlasldm.bench.diversity`), and each rank's epoch mix; no IO.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from atlasldm.bench.diversity import RandomEntropy, batch_entropies, fmt_or_na
from atlasldm.data.config import DataConfig
from atlasldm.data.sampler import LockstepSampler


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


@dataclass
class RankTally:
    """What the sweep gathers from every rank of one (mode, N, W)."""

    declared: list[int] = field(default_factory=list)  # num_batches() per rank
    sizes: list[np.ndarray] = field(default_factory=list)  # emitted batch sizes per rank
    rows: list[np.ndarray] = field(default_factory=list)  # in-range rows per rank
    out_of_range: int = 0  # rows outside [0, N), all ranks
    diversity_per_rank: list[float] = field(default_factory=list)  # evaluated ranks' means
    diversity: list[np.ndarray] = field(default_factory=list)  # evaluated ranks' batch ratios


def epoch_plan(sampler: LockstepSampler, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, batch sizes) of one rank's epoch-0 plans, in emission order."""
    plans = list(sampler.rounds(0))
    rows = np.concatenate([np.asarray(p.rows, dtype=np.int64) for p in plans] or [[]])
    rows = rows.astype(np.int64)
    sizes = np.concatenate([np.asarray(p.batch_sizes, np.int64) for p in plans] or [[]])
    sizes = sizes.astype(np.int64)
    if int(sizes.sum()) != len(rows):
        raise ValueError(f"rank {rank}: batch sizes sum to {sizes.sum()} != {len(rows)} rows")
    return rows, sizes


def coverage_figures(tally: RankTally, n: int) -> dict[str, Any]:
    """Exactly once: the union of all ranks' rows is every row once."""
    rows = tally.rows
    seen = np.bincount(np.concatenate(rows), minlength=n) if rows else np.zeros(n)
    duplicates = int((seen > 1).sum())
    missing = int((seen == 0).sum())
    once = duplicates == 0 and missing == 0 and tally.out_of_range == 0
    return {
        "exactly_once": bool(once),
        "duplicate_rows": duplicates,
        "missing_rows": missing,
        "out_of_range_rows": tally.out_of_range,
    }


def balance_figures(tally: RankTally, cfg: DataConfig) -> dict[str, Any]:
    """Step balance: equal declared and emitted batch counts, lockstep batch sizes."""
    declared, emitted = tally.declared, [len(s) for s in tally.sizes]
    counts_equal = len(set(declared)) == 1 and declared == emitted
    all_sizes = np.concatenate(tally.sizes) if tally.sizes else np.zeros(0, np.int64)
    spread = 0
    if counts_equal and declared[0] > 0:
        grid = np.stack(tally.sizes)  # (W, batches): lockstep sizes, column by column
        spread = int((grid.max(axis=0) - grid.min(axis=0)).max())
    any_sizes = len(all_sizes) > 0
    return {
        "balanced": bool(counts_equal and (cfg.drop_last or spread <= 1)),
        "num_batches": declared[0],
        "num_batches_min": min(declared),
        "num_batches_max": max(declared),
        "emitted_batches_min": min(emitted),
        "emitted_batches_max": max(emitted),
        "batch_size_min": int(all_sizes.min()) if any_sizes else 0,
        "batch_size_max": int(all_sizes.max()) if any_sizes else 0,
        "full_batches_fraction": (
            float((all_sizes == cfg.micro_batch).mean()) if any_sizes else 0.0
        ),
        "batch_size_spread_across_ranks": spread,
    }


def diversity_figures(tally: RankTally) -> dict[str, Any]:
    """Per-batch diversity of the evaluated ranks: mean, worst rank, worst batch."""
    divs = np.concatenate(tally.diversity) if tally.diversity else np.zeros(0)
    per_rank = tally.diversity_per_rank
    return {
        "diversity_mean": float(divs.mean()) if len(divs) else None,
        "diversity_worst_rank": min(per_rank) if per_rank else None,
        "diversity_worst_batch": float(divs.min()) if len(divs) else None,
    }


def sweep_config(
    labels: np.ndarray,
    cfg: DataConfig,
    world_size: int,
    opts: argparse.Namespace,
    rand: RandomEntropy,
) -> dict[str, Any]:
    """Check one (mode, N, W): every rank's epoch-0 plans, as the stream would build them.

    `opts`: the run's `--mean-nnz` (sizes K) and `--max-eval-ranks` (diversity).
    """
    from atlasldm.data.stream_layout import stream_layout

    t0 = time.perf_counter()
    n, d = len(labels), len(rand.counts)
    C, K = stream_layout(cfg, n, world_size, opts.mean_nnz)
    evaluated = set(evaluated_ranks(world_size, opts.max_eval_ranks).tolist())
    tally = RankTally()
    mix = np.zeros((world_size, d), dtype=np.int64)
    for r in range(world_size):
        sampler = LockstepSampler(n, C, K, cfg.micro_batch, world_size, r, cfg.seed, cfg.drop_last)
        tally.declared.append(int(sampler.num_batches()))  # default: the whole epoch
        rows, sizes = epoch_plan(sampler, r)
        tally.sizes.append(sizes)
        bad = (rows < 0) | (rows >= n)
        tally.out_of_range += int(bad.sum())
        rows = rows[~bad]
        tally.rows.append(rows)
        mix[r] = np.bincount(labels[rows], minlength=d)
        if r in evaluated and not bad.any():
            ratios = rand.ratios(batch_entropies(labels[rows], sizes, d), sizes)
            tally.diversity.append(ratios)
            if len(ratios):
                tally.diversity_per_rank.append(float(ratios.mean()))
    head = {"mode": cfg.mode, "N": n, "W": world_size, "C": int(C), "K": int(K)}
    head |= {"micro_batch": cfg.micro_batch, "ranks_evaluated": len(evaluated)}
    return {
        **head,
        **coverage_figures(tally, n),
        **balance_figures(tally, cfg),
        **diversity_figures(tally),
        "epoch_mix_tv_max": float(_tv(mix).max()),
        "epoch_mix_tv_random_split_max": random_split_tv(labels, world_size, cfg.seed),
        "seconds": time.perf_counter() - t0,
    }


def world_sizes(max_world_size: int) -> list[int]:
    """1, 2, 4, ... up to max_world_size (inclusive when a power of two)."""
    out, w = [], 1
    while w <= max_world_size:
        out.append(w)
        w *= 2
    return out


def print_sweep_row(row: dict[str, Any]) -> None:
    """One line per (mode, N, W): layout, verdicts, batches, diversity, epoch mix."""
    print(
        f"sweep {row['mode']:6s} N={row['N']:>9,} W={row['W']:>5} C={row['C']} K={row['K']:>3} "
        f"once={row['exactly_once']!s:5s} balanced={row['balanced']!s:5s} "
        f"batches={row['num_batches']} size {row['batch_size_min']}-"
        f"{row['batch_size_max']} diversity {fmt_or_na(row['diversity_mean'])} "
        f"(worst rank {fmt_or_na(row['diversity_worst_rank'])}) "
        f"tv {row['epoch_mix_tv_max']:.4f} "
        f"(random {row['epoch_mix_tv_random_split_max']:.4f}) {row['seconds']:.2f} s",
        flush=True,
    )


def run_sweep(opts: argparse.Namespace) -> dict[str, Any]:
    """Part 1: every (N, mode, W); prints one line per configuration."""
    rows = []
    for n in opts.sweep_cells:
        census = census_labels(n, opts.datasets, opts.seed)
        rand = RandomEntropy(np.bincount(census, minlength=opts.datasets), seed=opts.seed)
        for mode in opts.modes:
            labels = mode_labels(census, mode, opts.seed)
            cfg = DataConfig(
                mode=mode,
                micro_batch=opts.micro_batch,
                seed=opts.seed,
                memory_budget_gb=opts.memory_budget_gb,
            )
            for w in world_sizes(opts.max_world_size):
                rows.append(sweep_config(labels, cfg, w, opts, rand))
                print_sweep_row(rows[-1])
    return {
        "label_layout": f"{opts.datasets} contiguous datasets, Dirichlet(1) sizes, "
        f"seed {opts.seed}",
        "mean_nnz": opts.mean_nnz,
        "configs": rows,
        "exactly_once": all(r["exactly_once"] for r in rows),
        "balanced": all(r["balanced"] for r in rows),
    }

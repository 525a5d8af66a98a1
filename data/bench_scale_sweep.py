"""Part 1 of the scale benchmark (data/bench_scale.py): the pure-numpy sampler sweep.

Census-layout labels, every rank's `LockstepSampler` epoch-0 plans checked for exactly-once
coverage, step balance, per-batch dataset diversity against random batches, and each rank's
epoch mix; no IO. The entropy helpers are shared with the timing workers
(data/bench_scale_stream.py).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from atlasldm.data.config import DataConfig
from atlasldm.data.sampler import LockstepSampler

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
    from atlasldm.data.stream import stream_layout

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
                    f"{row['batch_size_max']} diversity {fmt_or_na(row['diversity_mean'])} "
                    f"(worst rank {fmt_or_na(row['diversity_worst_rank'])}) "
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


def fmt_or_na(x: float | None) -> str:
    """Format an optional figure to 3 decimals, "n/a" when missing."""
    return "n/a" if x is None else f"{x:.3f}"


def _data_config(opts: argparse.Namespace, mode: str, **kw: Any) -> DataConfig:
    return DataConfig(
        mode=mode, micro_batch=opts.micro_batch, seed=opts.seed,
        memory_budget_gb=opts.memory_budget_gb, **kw,
    )  # fmt: skip

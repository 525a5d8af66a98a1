"""Lockstep sampler: coverage, balance, reshuffle and elastic restart (pure numpy, no IO)."""

from __future__ import annotations

import numpy as np
import pytest

from atlasldm.data.sampler import (
    LockstepSampler,
    elastic_restart,
    eval_rounds,
    stratified_permutation,
)
from atlasldm.data.stream_layout import BYTES_PER_NNZ, MAX_ROUND_CELLS, chunks_per_rank_from_budget


def epoch_batches(n, C, K, b, W, seed=0, epoch=0, drop_last=False, restarts=()):
    """Return per rank the list of row arrays, batch by batch."""
    out = []
    for r in range(W):
        s = LockstepSampler(n, C, K, b, W, r, seed, drop_last)
        batches = []
        for plan in s.rounds(epoch, restarts):
            bounds = np.concatenate([[0], np.cumsum(plan.batch_sizes)])
            batches += [plan.rows[a:e] for a, e in zip(bounds[:-1], bounds[1:], strict=True)]
        assert len(batches) == s.num_batches(restarts)
        out.append(batches)
    return out


@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize(
    ("n", "C", "K", "b"), [(1000, 16, 2, 8), (1001, 16, 3, 12), (997, 7, 4, 14), (50, 8, 2, 16)]
)
def test_exactly_once_disjoint_equal_counts(n, C, K, b, W):
    per_rank = epoch_batches(n, C, K, b, W, seed=3, epoch=1)
    counts = {len(batches) for batches in per_rank}
    assert len(counts) == 1, f"ranks emit different batch counts {counts}"
    rows = np.concatenate([np.concatenate(batches) for batches in per_rank])
    assert len(rows) == n and np.array_equal(np.sort(rows), np.arange(n))
    assert max(len(x) for batches in per_rank for x in batches) <= b
    # All but the tail batches are full size.
    s = LockstepSampler(n, C, K, b, W, 0, 3)
    rounds = s.layout().full_rounds
    assert all(len(x) == b for batches in per_rank for x in batches[: rounds * s.batches_per_round])


@pytest.mark.parametrize("W", [1, 2, 4])
def test_drop_last_fixed_size_bounded_loss_varying_tail(W):
    n, C, K, b = 1003, 16, 2, 8
    dropped = []
    for epoch in range(3):
        per_rank = epoch_batches(n, C, K, b, W, epoch=epoch, drop_last=True)
        assert len({len(x) for x in per_rank}) == 1
        rows = np.concatenate([np.concatenate(x) for x in per_rank])
        assert all(len(x) == b for batches in per_rank for x in batches)
        assert len(np.unique(rows)) == len(rows)
        assert 0 <= n - len(rows) < W * b
        assert len(rows) // (W * b) == n // (W * b)  # steps = floor(N / (W*b))
        dropped.append(frozenset(np.setdiff1d(np.arange(n), rows).tolist()))
    assert len(set(dropped)) > 1, "the same cells are dropped every epoch"


def test_reshuffle_per_epoch_and_seed():
    first = np.concatenate(epoch_batches(4096, 16, 4, 32, 2, seed=0, epoch=0)[0])
    again = np.concatenate(epoch_batches(4096, 16, 4, 32, 2, seed=0, epoch=0)[0])
    second = np.concatenate(epoch_batches(4096, 16, 4, 32, 2, seed=0, epoch=1)[0])
    other_seed = np.concatenate(epoch_batches(4096, 16, 4, 32, 2, seed=1, epoch=0)[0])
    assert np.array_equal(first, again)
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, other_seed)
    # A rank's rows change every epoch, not only their order (no fixed 1/W shard).
    assert len(np.intersect1d(first, second)) < 0.75 * len(first)


def test_ranks_draw_from_whole_range():
    """Each rank's epoch covers all 8 contiguous blocks of the sorted selection."""
    per_rank = epoch_batches(8192, 64, 2, 64, 4)
    for batches in per_rank:
        blocks = np.unique(np.concatenate(batches) // 1024)
        assert len(blocks) == 8


def test_locate_matches_round_plans():
    s = LockstepSampler(1000, 16, 3, 12, 2, 1, 0)
    index = 0
    for plan in s.rounds(0):
        for micro in range(len(plan.batch_sizes)):
            assert s.locate((), index) == (plan.index, micro)
            assert plan.first_batch + micro == index
            index += 1
    # Starting from a later batch yields the rounds from the one holding it.
    plans = list(s.rounds(0, (), from_batch=s.batches_per_round + 1))
    assert plans[0].index == 1


def test_bad_k_c_b_rejected():
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        LockstepSampler(100, 10, 3, 7, 1, 0, 0)
    with pytest.raises(ValueError, match="rank"):
        LockstepSampler(100, 10, 1, 5, 2, 2, 0)


@pytest.mark.parametrize(("old_w", "new_w"), [(2, 3), (3, 2), (2, 4)])
@pytest.mark.parametrize("stop_frac", [0.0, 0.3, 0.55, 0.97])
def test_elastic_restart_loses_nothing(old_w, new_w, stop_frac):
    n, C, K, b = 1001, 16, 3, 12
    old = epoch_batches(n, C, K, b, old_w, epoch=2)
    total = len(old[0])
    stop = int(stop_frac * total)
    consumed = np.concatenate([np.concatenate(x[:stop] or [np.zeros(0, np.int64)]) for x in old])
    sampler = LockstepSampler(n, C, K, b, old_w, 0, 0)
    moved = elastic_restart(sampler, (), stop, "restart_round")
    replayed = moved.replayed_cells
    assert moved.skipped_cells == 0
    rest = epoch_batches(n, C, K, b, new_w, epoch=2, restarts=moved.restarts)
    rest_rows = np.concatenate([np.concatenate(x) for x in rest])
    assert len({len(x) for x in rest}) == 1
    union = np.union1d(consumed, rest_rows)
    assert np.array_equal(union, np.arange(n)), "a cell of the epoch was lost"
    duplicates = len(consumed) + len(rest_rows) - n
    assert duplicates == replayed
    assert replayed <= old_w * K * C, "replay exceeds one round"


def test_elastic_skip_round_and_epoch_end():
    n, C, K, b, W = 1000, 16, 2, 8, 2
    s = LockstepSampler(n, C, K, b, W, 0, 0)
    moved = elastic_restart(s, (), 1, "skip_round")
    assert (moved.replayed_cells, moved.skipped_cells) == (0, W * K * C - W * b)
    # The skipped round's cells are all that is missing from the rest of the epoch.
    first = np.concatenate([x[0] for x in epoch_batches(n, C, K, b, W)])
    rest = np.concatenate(
        [np.concatenate(x) for x in epoch_batches(n, C, K, b, 3, restarts=moved.restarts)]
    )
    assert len(np.intersect1d(first, rest)) == 0
    assert len(first) + len(rest) == n - moved.skipped_cells
    end = elastic_restart(s, (), s.num_batches(), "restart_round")
    assert (end.restarts, end.replayed_cells, end.skipped_cells) == (None, 0, 0)


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_eval_rounds_cover_once(W):
    n, b = 1001, 32
    per_rank = []
    for r in range(W):
        sizes = [p.batch_sizes for p in eval_rounds(n, W, r, b, rows_per_round=128)]
        rows = [p.rows for p in eval_rounds(n, W, r, b, rows_per_round=128)]
        per_rank.append((np.concatenate(sizes), np.concatenate(rows)))
    assert len({len(sizes) for sizes, _ in per_rank}) == 1
    all_rows = np.concatenate([rows for _, rows in per_rank])
    assert np.array_equal(all_rows, np.arange(n))  # unshuffled, disjoint, complete
    assert max(int(sizes.max()) for sizes, _ in per_rank) <= b


def test_chunks_per_rank_from_budget():
    k = chunks_per_rank_from_budget(2000, 256, 1024, budget_gb=4.0, prefetch_rounds=1)
    assert k % 4 == 0 and k >= 4  # K*C must be a multiple of the micro-batch
    in_flight = 3 * k * 256 * 2000 * BYTES_PER_NNZ
    assert in_flight <= 0.5 * 4e9
    smaller = chunks_per_rank_from_budget(2000, 256, 1024, budget_gb=1.0, prefetch_rounds=1)
    assert smaller < k
    # A tiny budget still yields one valid round; tiny cells are capped by round size.
    assert chunks_per_rank_from_budget(1e6, 256, 1024, 0.001, 1) == 4
    assert chunks_per_rank_from_budget(1, 256, 256, 4.0, 1) * 256 <= MAX_ROUND_CELLS


@pytest.mark.parametrize(("n", "W"), [(1001, 2), (997, 4), (5000, 3)])
def test_tail_full_batches_then_one_smaller(n, W):
    b = 8
    per_rank = epoch_batches(n, 16, 2, b, W)
    lasts = [len(batches[-1]) for batches in per_rank]
    assert max(lasts) - min(lasts) <= 1 and min(lasts) > 0
    assert all(len(x) == b for batches in per_rank for x in batches[:-1])


@pytest.mark.parametrize("seed", range(5))
def test_stratified_permutation_spreads_every_aligned_run(seed):
    n = 256
    perm = stratified_permutation(n, np.random.default_rng(seed))
    assert np.array_equal(np.sort(perm), np.arange(n))
    for k in range(1, 9):
        run = 1 << k
        for start in range(0, n, run):  # one id from each 1/run of the range
            assert len(np.unique(perm[start : start + run] * run // n)) == run


def mean_strata_per_run(perms: list[np.ndarray], n: int, run: int) -> float:
    """Mean number of distinct 1/run strata of [0, n) in the aligned runs of `run` positions."""
    return float(
        np.mean(
            [
                len(np.unique(p[i : i + run] * run // n))
                for p in perms
                for i in range(0, n - run, run)
            ]
        )
    )


def test_stratified_permutation_random_and_spread_for_any_length():
    n, K = 1000, 8
    perms = [stratified_permutation(n, np.random.default_rng(s)) for s in range(20)]
    assert all(np.array_equal(np.sort(p), np.arange(n)) for p in perms)
    assert len({p[:50].tobytes() for p in perms}) == len(perms)
    assert len({int(p[0]) for p in perms}) > 12  # any chunk may come first
    # Runs of K cover more of the K strata than a uniform permutation's (5.26 of 8 expected).
    rng = np.random.default_rng(0)
    uniform = [rng.permutation(n) for _ in range(20)]
    assert mean_strata_per_run(perms, n, K) > 6.5 > 5.5 > mean_strata_per_run(uniform, n, K)


@pytest.mark.parametrize("W", [1, 3, 4])
def test_each_rank_round_and_epoch_spread_over_the_selection(W):
    """A rank's round is a run of the stratified order, and so is its epoch."""
    n, C, K, b = 8192 * W, 16, 32, 64
    for r in range(W):
        s = LockstepSampler(n, C, K, b, W, r, seed=5)
        plans = list(s.rounds(epoch=1))
        # A uniformly random set of K chunks meets ~0.64*K of the K equal parts of the
        # selection; a run of the stratified order meets all of them when aligned, ~0.8*K else.
        for plan in plans[: s.layout().full_rounds]:
            strata = np.unique(plan.rows // (n // K))
            assert len(strata) >= 0.75 * K, f"rank {r} round {plan.index}: {len(strata)} of {K}"
        rows = np.concatenate([p.rows for p in plans])
        parts = np.bincount(rows * 16 // n, minlength=16)  # 16 equal parts: in proportion
        assert parts.min() >= 0.8 * len(rows) / 16, f"rank {r} epoch mix {parts}"

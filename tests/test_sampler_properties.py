"""Property-based tests of the lockstep sampler over random shapes (pure numpy, ranks simulated).

Shapes: N in [1, 10^5] cells, W in [1, 1024] ranks, any chunk length C, chunks per rank round K
and micro-batch b with K*C a multiple of b, drop_last on or off, and the (C, K) the stream
derives itself. The CI profile runs a bounded number of examples; the `slow` test runs many more.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlasldm.data.config import DataConfig
from atlasldm.data.sampler import LockstepSampler, Restart, elastic_restart, eval_rounds
from atlasldm.data.stream_layout import stream_layout

CI_EXAMPLES = 60
DEEP_EXAMPLES = 2000
MAX_ROUNDS = 64  # per rank per epoch: keeps one example under a second


@st.composite
def layouts(draw, num_rows: int | None = None) -> dict:
    """Draw (N, C, K, b, W, drop_last, seed, epoch): explicit, or derived like the stream."""
    N = num_rows or draw(st.integers(1, 100_000))
    W = draw(st.integers(1, 1024))
    b = draw(st.sampled_from([1, 2, 3, 7, 32, 50, 256]))
    if draw(st.booleans()):  # the stream's own choice for this shape
        mode = draw(st.sampled_from(["copy", "direct"]))
        cfg = DataConfig(source="x", mode=mode, micro_batch=b)
        C, K = stream_layout(cfg, N, W, mean_nnz=draw(st.sampled_from([200.0, 2000.0])))
    else:
        C = draw(st.integers(1, 600))
        step = b // math.gcd(b, C)  # K must make K*C a multiple of b
        least = max(1, -(-N // (W * C * MAX_ROUNDS)))
        K = step * draw(st.integers(-(-least // step), -(-least // step) + 6))
    return {
        "N": N,
        "C": C,
        "K": K,
        "b": b,
        "W": W,
        "drop_last": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31)),
        "epoch": draw(st.integers(0, 5)),
    }


def samplers(shape: dict, world_size: int | None = None, K: int | None = None, b=None):
    W = world_size or shape["W"]
    return [
        LockstepSampler(
            shape["N"],
            shape["C"],
            K or shape["K"],
            b or shape["b"],
            W,
            r,
            shape["seed"],
            shape["drop_last"],
        )
        for r in range(W)
    ]


def batches_of(sampler: LockstepSampler, epoch: int, restarts=(), from_batch: int = 0) -> list:
    """The rows of each batch the sampler emits from `from_batch`, resumed like the stream."""
    out = []
    for plan in sampler.rounds(epoch, restarts, from_batch):
        plan = plan.without_first(from_batch - plan.first_batch)
        bounds = np.concatenate([[0], np.cumsum(plan.batch_sizes)])
        out += [plan.rows[a:e] for a, e in zip(bounds[:-1], bounds[1:], strict=True)]
    return out


def all_rows(per_rank: list[list[np.ndarray]]) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.int64)] + [x for batches in per_rank for x in batches])


def check_epoch(shape: dict) -> list[list[np.ndarray]]:
    """Exactly once (or bounded drop), equal step counts, batch sizes within b."""
    ranks = samplers(shape)
    per_rank = [batches_of(s, shape["epoch"]) for s in ranks]
    steps = {len(batches) for batches in per_rank}
    assert steps == {ranks[0].num_batches()}, f"ranks take different step counts {steps}"
    rows, N, b = all_rows(per_rank), shape["N"], shape["b"]
    assert len(np.unique(rows)) == len(rows), "a cell is emitted twice in one epoch"
    sizes = np.array([len(x) for batches in per_rank for x in batches])
    assert sizes.size == 0 or sizes.max() <= b
    if shape["drop_last"]:
        assert (sizes == b).all() and 0 <= N - len(rows) < shape["W"] * b
    else:
        assert len(rows) == N, f"{N - len(rows)} cells of the epoch were never emitted"
    return per_rank


def check_resume(shape: dict, per_rank: list, rank: int, batch: int) -> None:
    sampler = samplers(shape)[rank]
    resumed = batches_of(sampler, shape["epoch"], (), batch)
    expected = per_rank[rank][batch:]
    assert len(resumed) == len(expected)
    assert all(np.array_equal(a, e) for a, e in zip(resumed, expected, strict=True))


def check_elastic(shape: dict, per_rank: list, stop: int, new_w: int, policy: str) -> None:
    """Stop after `stop` batches, go on with `new_w` ranks, then once more with 3 ranks."""
    if shape["drop_last"]:
        return  # drop_last already drops a window of the tail; coverage is not promised
    consumed = all_rows([batches[:stop] for batches in per_rank])
    moved = elastic_restart(samplers(shape)[0], (), stop, policy)
    rest = np.zeros(0, np.int64)
    if moved.restarts is not None:
        new = samplers(shape, new_w)
        rest_ranks = [batches_of(s, shape["epoch"], moved.restarts) for s in new]
        assert len({len(x) for x in rest_ranks}) == 1, "ranks of the new layout differ in steps"
        # ... and a second world-size change half way through the new segment
        stop2 = len(rest_ranks[0]) // 2
        again = elastic_restart(new[0], moved.restarts, stop2, "restart_round")
        rest = all_rows([batches[:stop2] for batches in rest_ranks])
        if again.restarts is not None:
            third = samplers(shape, 3)
            rest = np.concatenate(
                [rest, *[all_rows([batches_of(s, shape["epoch"], again.restarts)]) for s in third]]
            )
            assert isinstance(again.restarts[-1], Restart)
        assert len(rest) - len(np.unique(rest)) == again.replayed_cells
        rest = np.unique(rest)
    if policy == "restart_round":
        assert np.array_equal(np.union1d(consumed, rest), np.arange(shape["N"])), "a cell was lost"
        assert len(consumed) + len(rest) - shape["N"] == moved.replayed_cells
    else:
        assert len(np.intersect1d(consumed, rest)) == 0
        assert len(consumed) + len(rest) == shape["N"] - moved.skipped_cells


def check_eval(N: int, W: int, b: int) -> None:
    per_rank = [list(eval_rounds(N, W, r, b, rows_per_round=4 * b)) for r in range(W)]
    counts = {sum(len(p.batch_sizes) for p in plans) for plans in per_rank}
    assert len(counts) == 1, f"eval ranks take different step counts {counts}"
    rows = np.concatenate([p.rows for plans in per_rank for p in plans] + [np.zeros(0, np.int64)])
    assert np.array_equal(rows, np.arange(N)), "the validation pass does not cover every cell once"


@st.composite
def scenarios(draw) -> tuple:
    shape = draw(layouts())
    total = LockstepSampler(
        shape["N"], shape["C"], shape["K"], shape["b"], shape["W"], 0, 0, shape["drop_last"]
    ).num_batches()
    return (
        shape,
        draw(st.integers(0, shape["W"] - 1)),
        draw(st.integers(0, total)),
        draw(st.integers(1, 1024)),
        draw(st.sampled_from(["restart_round", "skip_round"])),
    )


def run_scenario(scenario: tuple) -> None:
    shape, rank, stop, new_w, policy = scenario
    per_rank = check_epoch(shape)
    check_resume(shape, per_rank, rank, stop)
    check_elastic(shape, per_rank, stop, new_w, policy)
    check_eval(shape["N"], new_w, shape["b"])


@settings(max_examples=CI_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_sampler_properties(scenario):
    run_scenario(scenario)


@pytest.mark.slow
@settings(max_examples=DEEP_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_sampler_properties_deep(scenario):
    run_scenario(scenario)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4000), st.integers(1, 64), st.sampled_from([1, 5, 64]))
def test_tiny_corpora_and_more_ranks_than_cells(N, W, b):
    """N < W and b = 1 give empty batches on some ranks, never a crash or a lost cell."""
    shape = {"N": N, "C": 1, "K": b, "b": b, "W": W, "drop_last": False, "seed": 1, "epoch": 0}
    check_epoch(shape)

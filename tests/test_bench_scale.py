"""Scale benchmark harness (bench/scale*.py): end to end on a tiny corpus, and its checks
really catch a sampler whose ranks overlap or whose ranks take different step counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from atlasldm.bench import scale, scale_sweep
from atlasldm.bench.diversity import RandomEntropy, batch_entropies, batch_entropy
from atlasldm.data.sampler import LockstepSampler

SWEEP = ["--parts", "sweep", "--sweep-cells", "3000", "--max-world-size", "8",
         "--datasets", "4", "--micro-batch", "64", "--max-eval-ranks", "3"]  # fmt: skip
# All three parts on tiny corpora, workers inline.
END_TO_END = ["--sweep-cells", "3000", "--max-world-size", "4", "--datasets", "4",
              "--genes", "100", "--micro-batch", "64",
              "--timing-cells", "3000", "--timing-world-sizes", "1", "2", "--max-cells", "500",
              "--flat-cells", "2000", "3000", "--flat-batches", "2", "--inline"]  # fmt: skip
# The timing part alone, two ranks as real processes.
TWO_RANK_PROCESSES = ["--parts", "timing", "--modes", "copy", "--datasets", "4",
                      "--genes", "100", "--micro-batch", "64", "--timing-cells", "3000",
                      "--timing-world-sizes", "2", "--max-cells", "500"]  # fmt: skip


def _last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_batch_entropies_match_benchmark() -> None:
    rng = np.random.default_rng(0)
    sizes = np.array([64, 1, 30, 64, 0, 7])
    labels = rng.integers(0, 5, sizes.sum())
    got = batch_entropies(labels, sizes, 5)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    want = [
        batch_entropy(labels[a:b]) if b > a else 0.0
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    assert np.allclose(got, want)
    # Random batches score ~1 against the random reference; one-label batches score 0.
    rand = RandomEntropy(np.bincount(labels, minlength=5), draws=500)
    shuffled = rng.permutation(np.repeat(np.arange(5), 400))
    sizes = np.full(20, 100)
    ratio = rand.ratios(batch_entropies(shuffled, sizes, 5), sizes)
    assert abs(ratio.mean() - 1) < 0.03
    grouped = np.sort(shuffled)
    assert rand.ratios(batch_entropies(grouped, sizes, 5), sizes).max() < 0.2


def test_census_labels_layout() -> None:
    labels = scale_sweep.census_labels(10_000, 20)
    assert len(labels) == 10_000 and np.all(np.diff(labels) >= 0)  # contiguous blocks
    assert np.array_equal(np.unique(labels), np.arange(20))
    copy = scale_sweep.mode_labels(labels, "copy")
    assert np.array_equal(np.sort(copy), labels) and not np.array_equal(copy, labels)
    assert list(scale_sweep.evaluated_ranks(1024, 64)[[0, -1]]) == [0, 1023]
    assert len(scale_sweep.evaluated_ranks(1024, 64)) == 64


def test_sweep_passes_on_the_real_sampler(tmp_path: Path, capsys) -> None:
    assert scale.main([*SWEEP, "--out", str(tmp_path / "r.json")]) == 0
    report = _last_json(capsys)
    assert report == json.loads((tmp_path / "r.json").read_text())
    configs = report["sweep"]["configs"]
    assert {(c["mode"], c["W"]) for c in configs} == {
        (m, w) for m in ("copy", "direct") for w in (1, 2, 4, 8)
    }
    for c in configs:
        assert c["exactly_once"] and c["balanced"], c
        assert c["duplicate_rows"] == c["missing_rows"] == 0
        assert c["num_batches_min"] == c["num_batches_max"] == c["emitted_batches_max"]
        assert 1 <= c["batch_size_min"] <= c["batch_size_max"] == 64
        assert c["ranks_evaluated"] == min(c["W"], 3)
        assert 0.8 < c["diversity_mean"] < 1.2 and c["diversity_worst_rank"] > 0.5
        assert 0 <= c["epoch_mix_tv_max"] < 1
    assert report["exactly_once"] and report["balanced"] and report["ok"]


class OverlappingSampler(LockstepSampler):
    """Broken: every rank plans rank 0's rows (ranks overlap, other rows are never emitted)."""

    def __init__(
        self,
        num_rows,
        chunk_cells,
        chunks_per_rank,
        micro_batch,
        world_size,
        rank,
        seed,
        drop_last=False,
    ):
        super().__init__(
            num_rows, chunk_cells, chunks_per_rank, micro_batch, world_size, 0, seed, drop_last
        )


class UnequalStepsSampler(LockstepSampler):
    """Broken: rank 1 declares one batch more than the others (collectives would hang)."""

    def __init__(
        self,
        num_rows,
        chunk_cells,
        chunks_per_rank,
        micro_batch,
        world_size,
        rank,
        seed,
        drop_last=False,
    ):
        super().__init__(
            num_rows, chunk_cells, chunks_per_rank, micro_batch, world_size, rank, seed, drop_last
        )
        self.extra = int(rank == 1)

    def num_batches(self, *args, **kwargs) -> int:
        return super().num_batches(*args, **kwargs) + self.extra


class DroppingSampler(UnequalStepsSampler):
    """Broken: rank 1 loses its last round (fewer batches emitted, rows missing)."""

    def num_batches(self, *args, **kwargs) -> int:
        return LockstepSampler.num_batches(self, *args, **kwargs)

    def rounds(self, *args, **kwargs):
        plans = list(super().rounds(*args, **kwargs))
        yield from (plans[:-1] if self.extra else plans)


@pytest.mark.parametrize(
    ("broken", "once", "balanced"),
    [
        (OverlappingSampler, False, True),
        (UnequalStepsSampler, True, False),
        (DroppingSampler, False, False),
    ],
)
def test_sweep_flags_a_broken_sampler(tmp_path, capsys, monkeypatch, broken, once, balanced):
    monkeypatch.setattr(scale_sweep, "LockstepSampler", broken)  # sweep_config's
    assert scale.main([*SWEEP, "--out", str(tmp_path / "r.json")]) == 1  # check failed
    report = _last_json(capsys)
    assert report["exactly_once"] is once and report["balanced"] is balanced
    assert report["ok"] is False
    multi = [c for c in report["sweep"]["configs"] if c["W"] > 1]
    single = [c for c in report["sweep"]["configs"] if c["W"] == 1]
    assert all(c["exactly_once"] is once and c["balanced"] is balanced for c in multi)
    assert all(c["exactly_once"] and c["balanced"] for c in single)  # rank 0 alone is fine
    if not once:
        assert all(c["missing_rows"] > 0 for c in multi)
    if broken is OverlappingSampler:
        assert all(c["duplicate_rows"] > 0 for c in multi)


def test_end_to_end_tiny_corpus(tmp_path: Path, capsys) -> None:
    """All three parts on 2,000- and 3,000-cell corpora, workers inline (seconds)."""
    out = tmp_path / "report.json"
    argv = [*END_TO_END, "--cache", str(tmp_path / "cache"), "--out", str(out)]
    assert scale.main(argv) == 0
    report = _last_json(capsys)
    assert report == json.loads(out.read_text())
    assert report["ok"] and report["exactly_once"] and report["balanced"]
    assert report["resume_matches"] is True
    timing = report["timing"]
    assert [(r["mode"], r["W"]) for r in timing["runs"]] == [
        ("copy", 1),
        ("copy", 2),
        ("direct", 1),
        ("direct", 2),
    ]
    for run in timing["runs"]:
        assert len(run["ranks"]) == run["W"] == len(run["peak_rss_gb"])
        assert run["cells_per_s_total"] > 0 and all(x > 0 for x in run["cells_per_s_per_rank"])
        assert run["timed_span_s"] > 0
        assert all(c >= 0 for c in run["cpu_seconds"])
        assert all(0.5 < d < 1.5 for d in run["diversity"])
        assert len({r["batches_per_epoch"] for r in run["ranks"]}) == 1
    flat = report["flat"]
    for mode in ("copy", "direct"):
        rows = flat["modes"][mode]
        assert set(rows) == {"2000", "3000"}
        for row in rows.values():
            assert row["peak_rss_gb"] > 0 and row["startup_s"] > 0
            assert row["resume_first_batch_s"] > 0 and row["state_dict_chars"] > 0
            assert row["resume_matches"] is True
            assert row["mid_batch"] == row["batches_per_epoch"] // 2
        ratio = flat["ratio_largest_to_smallest"][mode]
        assert ratio["cells"] == "3000/2000"
        assert 0.5 < ratio["state_dict_chars"] < 2  # the position does not grow with N
    for n in ("2000", "3000"):
        disk = flat["disk"][n]
        assert disk["census_layout_bytes"] > 0 and disk["training_copy_bytes"] > 0
        assert report["corpora"][n]["mean_nnz"] > 0


def test_timing_ranks_run_as_processes(tmp_path: Path, capsys) -> None:
    """Two ranks as two fresh processes behind a barrier, copy mode only."""
    argv = [
        *TWO_RANK_PROCESSES,
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "r.json"),
    ]
    assert scale.main(argv) == 0
    (run,) = _last_json(capsys)["timing"]["runs"]
    assert [r["rank"] for r in run["ranks"]] == [0, 1]
    assert all(r["world_size"] == 2 and r["peak_rss_gb"] > 0.05 for r in run["ranks"])

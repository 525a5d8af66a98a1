"""The loader benchmark (bench/loader*.py): its timed loop, diversity scoring, annbatch's venv
lookup, the h5ad it writes for scDataset, its input checks, and the whole harness on a tiny
corpus (annbatch skipped with its reason: CI creates no venv)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasldm.bench import loader, loader_peers, loader_peers_env
from atlasldm.bench.diversity import RandomEntropy, batch_entropy
from atlasldm.bench.loader_peers_measure import (
    order_differs,
    over_epochs,
    time_batches,
)

TINY = ["--cells", "1500", "--genes", "300", "--datasets", "4", "--seconds", "1"]


def fake_loader(sizes: list[int], labels: int = 3):
    """(cells, nnz, codes) per batch; codes cycle through `labels` values."""
    for i, n in enumerate(sizes):
        yield n, 10 * n, (np.arange(n) + i) % labels


@given(st.lists(st.integers(1, 300), min_size=1, max_size=30))
@settings(max_examples=30, deadline=None)
def test_time_batches_skips_the_first_batch_and_saves_the_rest(tmp_path_factory, sizes) -> None:
    codes = str(tmp_path_factory.mktemp("c") / "codes.npz")
    out = time_batches(fake_loader(sizes), max_cells=10**9, seconds=1e9, codes_out=codes)
    assert out["cells"] == sum(sizes[1:]) and out["nnz"] == 10 * sum(sizes[1:])
    assert out["batches"] == len(sizes) - 1
    with np.load(codes) as z:
        assert z["sizes"].tolist() == sizes[1:]
        assert len(z["labels"]) == sum(sizes[1:])


def test_time_batches_stops_at_max_cells_and_closes_the_loader() -> None:
    closed = []

    def batches():
        try:
            while True:
                yield 256, 1, np.zeros(256, dtype=int)
        finally:
            closed.append(True)

    out = time_batches(batches(), max_cells=1000, seconds=1e9)
    assert out["cells"] == 1024 and closed == [True]


@given(st.lists(st.integers(1, 300), min_size=1, max_size=20), st.integers(1, 3000))
@settings(max_examples=30, deadline=None)
def test_the_window_runs_across_epochs_and_the_second_epoch_is_timed_whole(
    sizes, max_cells
) -> None:
    epochs = []

    def start_epoch(e: int):
        epochs.append(e)
        return fake_loader(sizes)

    out = time_batches(over_epochs(start_epoch), max_cells, seconds=1e9, epoch_seconds=1e9)
    assert max_cells <= out["cells"] < max_cells + max(sizes)  # not cut at an epoch's end
    assert out["epoch_cells"] == sum(sizes)  # epoch 1, every batch of it
    assert out["epoch_seconds"] > 0 and out["epoch_cpu_seconds"] >= 0
    assert epochs == list(range(len(epochs))) and len(epochs) >= 2


def test_no_epoch_figures_unless_the_second_epoch_ends_in_time() -> None:
    closed = []

    def endless(_e: int):
        try:
            while True:
                time.sleep(0.001)
                yield 256, 1, np.zeros(256, dtype=int)
        finally:
            closed.append(True)

    out = time_batches(over_epochs(endless), 1000, seconds=1e9, epoch_seconds=0.05)
    assert out["cells"] == 1024 and out["epoch_seconds"] is None and closed == [True]
    short = over_epochs(lambda _e: fake_loader([256] * 8))
    off = time_batches(short, max_cells=1000, seconds=1e9)  # epoch_seconds = 0: stop at once
    assert off["epoch_cells"] is None and off["cells"] == 1024


def test_a_first_epoch_past_half_the_epoch_time_stops_the_run() -> None:
    """The second epoch lasts about as long as the first: past half the time, give up."""
    pulled = []

    def slow(_e: int):
        for _ in range(3):
            time.sleep(0.2)
            pulled.append(1)
            yield 256, 1, np.zeros(256, dtype=int)

    out = time_batches(over_epochs(slow), max_cells=256, seconds=1e9, epoch_seconds=1.0)
    assert out["epoch_seconds"] is None and len(pulled) == 3  # stopped before epoch 1's end


def test_an_empty_shard_ends_after_one_empty_epoch() -> None:
    out = time_batches(over_epochs(lambda _e: iter([])), 10, seconds=1.0, epoch_seconds=1e9)
    assert out["cells"] == 0 and out["epoch_cells"] is None


def test_time_batches_of_an_empty_shard_is_a_row_of_zeros() -> None:
    out = time_batches(iter([]), max_cells=10, seconds=1.0)
    assert out["cells"] == 0 and out["cells_per_s"] == 0.0


def test_order_differs_sees_a_repeated_first_batch() -> None:
    same = order_differs(lambda _e: iter([np.arange(4)]))
    other = order_differs(lambda e: iter([np.arange(4) + e]))
    assert (same, other) == (False, True)


def test_score_is_one_for_random_batches_and_zero_for_single_label_batches(tmp_path) -> None:
    population = np.repeat(np.arange(5), 2000)
    rand = RandomEntropy(np.bincount(population))
    rng = np.random.default_rng(0)
    shuffled, grouped = rng.permutation(population)[:5120], np.sort(population)[:5120]
    for name, labels in (("r", shuffled), ("g", grouped)):
        np.savez(tmp_path / f"{name}.npz", labels=labels, sizes=np.full(20, 256))
    assert loader_peers.score(str(tmp_path / "r.npz"), rand) == pytest.approx(1.0, abs=0.05)
    assert loader_peers.score(str(tmp_path / "g.npz"), rand) < 0.1
    expected = np.mean([batch_entropy(b) for b in grouped.reshape(20, 256)]) / rand(256)
    assert loader_peers.score(str(tmp_path / "g.npz"), rand) == pytest.approx(expected)


def test_combine_adds_throughput_and_keeps_the_worst_memory() -> None:
    outs = [
        {"cells": 10, "nnz": 100, "cells_per_s": 5.0, "cpu_seconds": 2.0, "first_batch_s": 1.0,
         "peak_rss_gb": 1.0},
        {"cells": 30, "nnz": 300, "cells_per_s": 7.0, "cpu_seconds": 2.0, "first_batch_s": 3.0,
         "peak_rss_gb": 0.5},
    ]  # fmt: skip
    row = loader_peers.combine(outs, [0.9, None])
    assert row["cells_per_s"] == 12.0 and row["nnz_per_cpu_s"] == 100.0
    assert (row["peak_rss_gb"], row["first_batch_s"], row["diversity_vs_random"]) == (1.0, 3.0, 0.9)


def test_annbatch_venv_is_not_created_when_not_allowed(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ATLASLDM_PY312", str(tmp_path / "no-python"))
    assert loader_peers_env.find_interpreter() is None
    python, why = loader_peers_env.annbatch_python(tmp_path, create=False)
    assert python is None and "no annbatch venv" in why
    assert not (tmp_path / "venvs").exists()
    python, why = loader_peers_env.annbatch_python(tmp_path, create=True)
    assert python is None and "3.12" in why


def test_the_venv_folder_follows_the_pins(tmp_path, monkeypatch) -> None:
    before = loader_peers_env.venv_dir(tmp_path)
    monkeypatch.setattr(loader_peers_env, "ANNBATCH_PINS", ("annbatch==0.0.1",))
    assert loader_peers_env.venv_dir(tmp_path) != before


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--cells", "0"], "--cells must be >= 1"),
        (["--seconds", "0"], "--seconds must be > 0"),
        (["--datasets", "50", "--cells", "40"], "must not exceed --cells"),
        (["--cells", "300"], "--cells must be >= 512"),
        (["--loaders", "torchdata"], "invalid choice"),
    ],
)
def test_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, argv, words) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as exc:
        loader.main([*argv, "--cache", str(cache)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and words in err
    assert len(err.strip().splitlines()) == 1 and not cache.exists()


def test_a_cache_that_is_a_file_is_refused(tmp_path, capsys) -> None:
    cache = tmp_path / "file"
    cache.write_text("x")
    with pytest.raises(SystemExit) as exc:
        loader.main(["--cache", str(cache)])
    assert exc.value.code == 2 and "is a file" in capsys.readouterr().err


def _run(tmp_path: Path, capsys, extra: list[str]) -> dict:
    assert loader.main([*TINY, "--cache", str(tmp_path), *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_harness_on_a_tiny_corpus(tmp_path, capsys) -> None:
    """Ours and scDataset, one process: rows, probes, formats; annbatch skipped (no venv)."""
    extra = ["--loaders", "ours", "scdataset", "--annbatch-venv", "existing", "--no-two-process"]
    summary = _run(tmp_path, capsys, extra)
    assert summary["skipped"]["annbatch"].startswith("no annbatch venv")
    a, b = summary["cases"]["a_census_layout"], summary["cases"]["b_training_copy"]
    assert set(a) == {loader.OURS["a_census_layout"], loader.OURS_H5AD, *loader.SCD_SETTINGS}
    assert set(b) == {loader.OURS["b_training_copy"], loader.OURS_COPY_TILEDB}
    for row in [*a.values(), *b.values()]:
        assert row["cells"] > 0 and row["cells_per_s"] > 0 and row["peak_rss_gb"] > 0
        assert 0.5 < row["diversity_vs_random"] < 1.2 and row["order_differs_tested"] is True
    ours = b[loader.OURS["b_training_copy"]]
    assert ours["resume_exact_tested"] is True and len(ours["resume_first_batch_s"]) == 4
    assert all(r["resume_api"] is False for r in (a[n] for n in loader.SCD_SETTINGS))
    t = summary["targets"]
    assert {"census_ratio_vs_scdataset", "census_h5ad_ratio_vs_scdataset"} <= set(t)
    best = a[t["census_best_scdataset"]]  # the ratios are of rows of this very run
    assert t["census_h5ad_ratio_vs_scdataset"] == pytest.approx(
        a[loader.OURS_H5AD]["cells_per_s"] / best["cells_per_s"]
    )
    assert a[loader.OURS_H5AD]["resume_exact_tested"] is True  # resume on the h5ad too
    assert all(f["disk_gb"] > 0 for f in summary["formats"].values())
    assert summary["features"]["atlasldm, row store"]["resume_mid_epoch"].startswith("yes")


def test_the_h5ad_holds_the_experiment(tmp_path, capsys) -> None:
    """scDataset's h5ad: the same counts and labels as the SOMA experiment, row for row."""
    import anndata as ad
    import tiledbsoma

    from atlasldm.bench.loader_peers_scdataset import SETTINGS, scdataset
    from atlasldm.data.soma import read_csr

    census_uri, copy = loader.build_datasets(tmp_path, 1500, 300, 4)
    h5ad = loader_peers.ensure_h5ad(copy.parent, census_uri)
    adata = ad.read_h5ad(h5ad)
    with tiledbsoma.Experiment.open(census_uri) as exp:
        ids = np.arange(1500, dtype=np.int64)
        X = read_csr(exp.ms["RNA"].X["raw"], ids, np.arange(300, dtype=np.int64))
        labels = exp.obs.read(column_names=["dataset_id"]).concat()["dataset_id"].to_numpy()
    assert (adata.X != X).nnz == 0
    assert adata.obs["dataset_id"].astype(str).tolist() == labels.astype(str).tolist()
    seen = []
    for batch_X, codes, cell_ids in scdataset(str(h5ad), SETTINGS[next(iter(SETTINGS))], 0, (0, 1)):
        assert (batch_X != X[cell_ids]).nnz == 0  # the fetch callback keeps rows with their ids
        assert codes.tolist() == adata.obs["dataset_id"].cat.codes.to_numpy()[cell_ids].tolist()
        seen.append(cell_ids)
    assert np.array_equal(np.sort(np.concatenate(seen)), ids)


@pytest.mark.slow
def test_harness_with_every_loader_and_two_processes(tmp_path, capsys) -> None:
    """Every loader incl. tiledbsoma-ml and the 2-rank runs; annbatch runs only if its venv
    already exists in this cache (CI: skipped, with the reason in the report)."""
    summary = _run(tmp_path, capsys, ["--annbatch-venv", "existing"])
    a, b = summary["cases"]["a_census_layout"], summary["cases"]["b_training_copy"]
    assert set(loader.ML_RUNS) <= set(a) and set(loader.ML_RUNS) <= set(b)
    two = b[f"{loader.OURS['b_training_copy']}, 2 processes"]
    assert two["processes"] == 2 and len(two["cells_per_s_per_process"]) == 2
    assert two["cells_per_s"] == pytest.approx(sum(two["cells_per_s_per_process"]))
    assert "annbatch" in summary["skipped"] or any(r["loader"] == "annbatch" for r in b.values())
    assert summary["features"]["tiledbsoma-ml"] == loader.ML_FEATURES


def test_tiledbsoma_ml_ranks_split_the_cells(tmp_path) -> None:
    """The 2-process tiledbsoma-ml row is two halves of one pass, not two whole passes."""
    census_uri, _ = loader.build_datasets(tmp_path, 1500, 300, 4)

    def cells(rank: int, world: int) -> int:
        argv = ["worker", "--loader", "ml", "--uri", census_uri, "--mode", "direct"]
        argv += ["--rank", str(rank), "--world", str(world), "--seconds", "60"]
        argv += ["--io-batch", "512", "--max-cells", "256", "--epoch-seconds", "240"]
        cmd = [sys.executable, "-m", "atlasldm.bench.loader", *argv]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])["epoch_cells"]  # a whole pass

    whole = cells(0, 1)
    halves = [cells(r, 2) for r in range(2)]
    assert whole > 1000 and all(abs(h - whole / 2) <= 256 for h in halves)

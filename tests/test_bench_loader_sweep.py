"""The loader benchmark's size sweep (bench/loader_sweep.py): its options, its table, and the
whole sweep on two tiny corpora (tiledbsoma-ml only where it is installed)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from atlasldm.bench import loader_sweep
from atlasldm.bench.loader_peers_measure import BATCH

TINY = ["--genes", "300", "--datasets", "4", "--seconds", "1", "--max-cells", "2000"]
HAVE_ML = importlib.util.find_spec("tiledbsoma_ml") is not None


def fake_row(cps: float, kind: str, nnz_rate: float = 1e7) -> dict:
    return {
        "cells_per_s": cps,
        "nnz_per_cpu_s": nnz_rate,
        "cpu_seconds": 2.0,
        "seconds": 1.0,
        "peak_rss_gb": 1.0,
        "diversity_vs_random": 0.99,
        "first_batch_s": 0.1,
        "loader": kind,
    }


def test_ratios_are_to_the_same_case_and_the_table_has_every_row() -> None:
    cases = {
        "a_census_layout": {
            loader_sweep.ML_DEFAULT: fake_row(100.0, "ml"),
            loader_sweep.ML_SPARSE: fake_row(200.0, "ml"),
            "ours direct": fake_row(400.0, "ours", 2e7),
        },
        "b_training_copy": {
            loader_sweep.ML_DEFAULT: fake_row(50.0, "ml"),
            "ours copy": fake_row(100.0, "ours"),
        },
    }
    records = loader_sweep.table_rows(1000, cases)
    ours = {r["loader"]: r for r in records if "vs_ml_default" in r}
    assert ours["ours direct"]["vs_ml_default"] == 4.0
    assert ours["ours direct"]["vs_ml_sparse"] == 2.0
    assert ours["ours direct"]["cpu_ns_per_nnz"] == pytest.approx(50.0)
    assert ours["ours copy"]["vs_ml_default"] == 2.0 and ours["ours copy"]["vs_ml_sparse"] is None
    table = loader_sweep.markdown(records)
    assert table.count("\n") == 1 + len(records)
    assert "| 4.00x | 2.00x | 50 |" in table and "| 2.00x | n/a |" in table


@pytest.mark.parametrize(
    ("sizes", "words"),
    [("1000,abc", "give cell counts"), ("1000,300", "must be >= 512"), ("1000,600", "exceeds")],
)
def test_bad_sizes_are_one_line_and_write_nothing(tmp_path, capsys, sizes, words) -> None:
    cache = tmp_path / "cache"
    argv = ["--sizes", sizes, "--datasets", "700", "--cells", "1000", "--cache", str(cache)]
    with pytest.raises(SystemExit) as exc:
        loader_sweep.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not cache.exists()


def test_sweep_on_two_tiny_corpora(tmp_path, capsys) -> None:
    """Every size and loader in one table; our ratios from the ml runs of the same invocation."""
    loaders = ["ml", "ours"] if HAVE_ML else ["ours"]
    argv = ["--sizes", "1500,2500", *TINY, "--cache", str(tmp_path), "--epoch-seconds", "300"]
    argv += ["--loaders", *loaders]
    argv += ["scdataset"]  # not a sweep loader: ignored
    assert loader_sweep.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    ours = list(loader_sweep.OURS_RUNS)
    ml = [loader_sweep.ML_DEFAULT, loader_sweep.ML_SPARSE] if HAVE_ML else []
    rows = {(r["cells"], r["loader"], r["case"]): r for r in summary["rows"]}
    for cells in (1500, 2500):
        got = {(name, case) for c, name, case in rows if c == cells}
        expected = {(n, "b_training_copy") for n in ours[1:]} | {(ours[0], "a_census_layout")}
        expected |= {(n, case) for n in ml for case in loader_sweep.CASE_LABEL}
        assert got == expected
        for (c, name, case), r in rows.items():
            if c != cells:
                continue
            assert r["cells_per_s"] > 0 and r["peak_rss_gb"] > 0 and r["cpu_seconds"] > 0
            assert r["cpu_ns_per_nnz"] > 0 and 0.5 < r["diversity"] < 1.2
            assert cells - BATCH < r["epoch_cells"] <= cells  # one whole epoch, timed
            assert r["epoch_seconds"] > 0 and r["epoch_cells_per_s"] > 0
            if name in ours and HAVE_ML:
                for rate, prefix in (
                    ("cells_per_s", "vs_ml"),
                    ("epoch_cells_per_s", "epoch_vs_ml"),
                ):
                    for suffix, base in (("default", ml[0]), ("sparse", ml[1])):
                        expect = r[rate] / rows[(cells, base, case)][rate]
                        assert r[f"{prefix}_{suffix}"] == pytest.approx(expect)
    table = "\n".join(out[:-1])
    assert table.count("| 1,500 |") == 2 and table.count("| 2,500 |") == 2  # both tables
    assert "| second epoch s |" in table
    assert all(f"| {name} |" in table for name in ours + ml)
    assert not (tmp_path / "synthetic_1500x300_d4" / "census_layout.h5ad").exists()

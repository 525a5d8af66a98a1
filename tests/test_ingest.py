"""Ingest: h5ad round trip, pbmc68k, permutation, bad inputs, resume and worker split."""

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from atlasldm.data import shuffle_spill
from atlasldm.data.config import DataConfig
from atlasldm.data.ingest import run_ingest
from atlasldm.data.materialize import open_copy_manifest
from atlasldm.data.pbmc import pbmc68k_counts
from atlasldm.data.rowstore import RowWriter
from atlasldm.data.rowstore import main as rowstore_main
from atlasldm.data.stream import CellStream
from atlasldm.data.synthetic import generate_anndata, parse_spec
from atlasldm.data.validate import IngestError
from atlasldm.data.vocab import GeneVocab, load_labels

RESUME_SOURCE = "synthetic:cells=1500,genes=80,datasets=3,cell_types=4,seed=5"
REPO = Path(__file__).resolve().parents[1]


def ingest(out, source, *extra):
    """Run the ingest command in-process; returns the copy folder."""
    run_ingest(["--source", str(source), "--out", str(out), "--log-level", "WARNING", *extra])
    return out


@pytest.fixture(scope="module")
def source_adata():
    """AnnData with raw counts in .raw and log-normalised X (as many published h5ads)."""
    counts = generate_anndata(parse_spec("cells=400,genes=60,datasets=3,cell_types=4,seed=2"))
    adata = ad.AnnData(
        X=sp.csr_matrix(np.log1p(counts.X.toarray())), obs=counts.obs.copy(), var=counts.var
    )
    adata.obs["batch_score"] = np.arange(adata.n_obs, dtype=np.float64) / 7
    adata.raw = counts
    return adata


@pytest.fixture(scope="module")
def h5ad_copy(source_adata, tmp_path_factory):
    path = tmp_path_factory.mktemp("h5") / "src.h5ad"
    source_adata.write_h5ad(path)
    out = tmp_path_factory.mktemp("h5copy") / "copy"
    ingest(out, path, "--block-cells", "128", "--obs-columns", "batch_score")
    return path, out


def test_h5ad_round_trip(source_adata, h5ad_copy, read_copy):
    _, out = h5ad_copy
    X, obs, var, side, manifest = read_copy(out)
    src = side["source_joinid"]
    np.testing.assert_array_equal(obs["source_joinid"], src)
    ref = sp.csr_matrix(source_adata.raw.X)[src]  # undo the permutation
    assert abs(X - ref).sum() == 0 and X.nnz == ref.nnz
    for col in ["cell_type", "dataset_id", "donor_id", "batch_score"]:
        np.testing.assert_array_equal(obs[col], source_adata.obs[col].to_numpy()[src])
    assert var["feature_id"].tolist() == source_adata.var["feature_id"].tolist()
    assert var["feature_name"].tolist() == source_adata.var["feature_name"].tolist()
    assert obs["tissue"].eq("blood").all() and manifest["filled_obs_columns"] == []
    np.testing.assert_allclose(side["library_size"], np.asarray(ref.sum(axis=1)).ravel())
    np.testing.assert_array_equal(side["nnz"], np.diff(ref.indptr))
    labels = load_labels(out / "labels.json")
    assert labels["cell_type"] == sorted(set(source_adata.obs["cell_type"]))
    codes = side["codes_cell_type"]
    assert [labels["cell_type"][c] for c in codes] == obs["cell_type"].tolist()
    assert GeneVocab.load(out / "genes.tsv").fingerprint() == manifest["gene_fingerprint"]


def test_permutation_real_and_seeded(h5ad_copy, tmp_path):
    path, out = h5ad_copy
    perm0 = np.load(out / "side" / "source_joinid.npy")
    n = perm0.size
    assert sorted(perm0.tolist()) == list(range(n)) and not np.array_equal(perm0, np.arange(n))
    same = np.load(ingest(tmp_path / "a", path, "--block-cells", "128") / "side/source_joinid.npy")
    other = ingest(tmp_path / "b", path, "--block-cells", "128", "--seed", "1")
    np.testing.assert_array_equal(same, perm0)
    assert not np.array_equal(np.load(other / "side" / "source_joinid.npy"), perm0)


def test_pbmc68k_copy(pbmc_copy, read_copy):
    X, obs, _, side, manifest = read_copy(pbmc_copy)
    assert manifest["n_cells"] == 700 and X.shape == (700, 765)
    assert np.all(X.data == np.round(X.data)) and X.data.min() > 0
    ref = sp.csr_matrix(pbmc68k_counts().X)[side["source_joinid"]]
    np.testing.assert_array_equal(side["library_size"], np.asarray(ref.sum(axis=1)).ravel())
    np.testing.assert_array_equal(side["library_size"], np.asarray(X.sum(axis=1)).ravel())
    assert len(load_labels(pbmc_copy / "labels.json")["cell_type"]) == 10
    assert set(obs["dataset_id"]) == {"pbmc68k"} and set(obs["tissue"]) == {"blood"}


def _bad_adata(kind):
    """A 40 x 12 count matrix with one defect."""
    rng = np.random.default_rng(0)
    X = rng.poisson(1.0, (40, 12)).astype(np.float32)
    ids = [f"ENSG{i:04d}" for i in range(12)]
    if kind == "fraction":
        X[3, 2] = 1.5
    elif kind == "negative":
        X[5, 1] = -2
    elif kind == "nan":
        X[7, 0] = np.nan
    elif kind == "dup_ids":
        ids[4] = ids[3]
    elif kind == "missing_ids":
        ids[6] = ""
    var = pd.DataFrame({"feature_id": ids}, index=[f"g{i}" for i in range(12)])
    obs = pd.DataFrame({"cell_type": ["A", "B"] * 20}, index=[f"c{i}" for i in range(40)])
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var)


BAD_CASES = [
    ("fraction", [], ["non-integer", "--round-counts", "soma_joinid=3"]),
    ("negative", [], ["negative", "--round-counts", "soma_joinid=5"]),
    ("nan", [], ["NaN", "soma_joinid=7"]),
    ("dup_ids", [], ["duplicate feature_id", "ENSG0003"]),
    ("missing_ids", [], ["empty or missing feature_id"]),
    ("ok", ["--obs-columns", "sex"], ["'sex'", "available columns", "cell_type"]),
    ("ok", ["--conditions", "disease"], ["'disease'", "available columns"]),
    ("ok", ["--obs-filter", "cell_type == 'Z'"], ["matches no cells", "cell_type == 'Z'"]),
    ("ok", ["--genes", "/no/such/genes.txt"], ["--genes", "/no/such/genes.txt not found"]),
    ("ok", ["--tiledb-config", "vfs.s3.region"], ["KEY=VALUE", "'vfs.s3.region'"]),
]


@pytest.mark.parametrize(("kind", "extra", "phrases"), BAD_CASES)
def test_bad_input_clear_error_and_no_manifest(tmp_path, kind, extra, phrases):
    path = tmp_path / "bad.h5ad"
    _bad_adata(kind).write_h5ad(path)
    with pytest.raises(IngestError) as err:
        ingest(tmp_path / "copy", path, *extra)
    for phrase in phrases:
        assert phrase in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "copy").exists()  # the refused run removed the folder it created
    with pytest.raises(IngestError, match="not a complete training copy.*--resume"):
        open_copy_manifest(tmp_path / "copy")


def test_refused_ingest_leaves_an_empty_folder_empty_and_keeps_resumable_state(tmp_path):
    path = tmp_path / "bad.h5ad"
    _bad_adata("fraction").write_h5ad(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="non-integer"):
        ingest(tmp_path / "empty", path)
    assert list((tmp_path / "empty").iterdir()) == []
    out = ingest(tmp_path / "copy", RESUME_SOURCE, "--block-cells", "256", "--max-blocks", "1")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(IngestError, match="--resume"):  # an interrupted ingest is not removed
        ingest(out, RESUME_SOURCE, "--block-cells", "256")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_round_counts_fixes_fraction_and_negative(tmp_path, read_copy):
    adata = _bad_adata("fraction")
    adata.X[5, 1] = -2
    adata.write_h5ad(tmp_path / "x.h5ad")
    X, _, _, side, _ = read_copy(ingest(tmp_path / "copy", tmp_path / "x.h5ad", "--round-counts"))
    ref = sp.csr_matrix(np.clip(np.round(adata.X.toarray()), 0, None))[side["source_joinid"]]
    assert abs(X - ref).sum() == 0 and X.data.min() > 0


def _same_copy(a, b, read_copy):
    Xa, obs_a, var_a, side_a, man_a = read_copy(a)
    Xb, obs_b, var_b, side_b, man_b = read_copy(b)
    assert abs(Xa - Xb).sum() == 0 and Xa.nnz == Xb.nnz
    pd.testing.assert_frame_equal(obs_a, obs_b)
    pd.testing.assert_frame_equal(var_a, var_b)
    assert side_a.keys() == side_b.keys()
    for k in side_a:
        np.testing.assert_array_equal(side_a[k], side_b[k])
    assert man_a["fingerprint"] == man_b["fingerprint"]
    _same_rows(a, b)
    np.testing.assert_array_equal(np.load(a / "rows" / "indptr.npy"), Xa.indptr)  # and equal X
    np.testing.assert_array_equal(np.load(a / "rows" / "genes.npy"), Xa.indices + 1)
    np.testing.assert_array_equal(np.load(a / "rows" / "counts.npy"), Xa.data)


def _same_rows(a, b):
    """The row stores of two copies hold the same files, element for element."""
    names = sorted(p.name for p in (a / "rows").iterdir())
    assert names == ["counts.npy", "genes.npy", "indptr.npy", "layout.json", "rows.json"]
    assert names == sorted(p.name for p in (b / "rows").iterdir())
    for name in names[:3]:
        x, y = np.load(a / "rows" / name), np.load(b / "rows" / name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    for name in names[3:]:
        assert (a / "rows" / name).read_text() == (b / "rows" / name).read_text(), name


def _stream_batches(copy):
    """Every batch of two epochs of a 2-rank stream over the copy (through its row store)."""
    cfg = DataConfig(
        source=str(copy), micro_batch=64, val_fraction=0.2, condition_columns=["cell_type"]
    )
    batches = []
    for rank in range(2):
        stream = CellStream(cfg, "train", rank, 2)
        for epoch in range(2):
            stream.set_epoch(epoch)
            batches.extend(stream)
        stream.close()
    return batches


def _same_batches(a, b):
    fields = ("gene_ids", "counts", "cu_seqlens", "library_size", "conditions", "soma_joinid")
    batches_a, batches_b = _stream_batches(a), _stream_batches(b)
    assert len(batches_a) == len(batches_b) > 0
    for x, y in zip(batches_a, batches_b, strict=True):
        for field in fields:
            assert torch.equal(getattr(x, field), getattr(y, field)), field


@pytest.fixture(scope="module")
def reference_copy(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "copy"
    return ingest(out, RESUME_SOURCE, "--block-cells", "256")


def test_resume_after_crash_equals_uninterrupted(reference_copy, tmp_path, read_copy):
    out = tmp_path / "copy"
    ingest(out, RESUME_SOURCE, "--block-cells", "256", "--max-blocks", "3")  # "crash"
    assert not (out / "manifest.json").exists()
    # A crash after block 1's fragments were written but before its done marker:
    (out / ".progress" / "block_000001.done").unlink()
    with pytest.raises(IngestError, match="--resume"):
        ingest(out, RESUME_SOURCE, "--block-cells", "256")
    with pytest.raises(IngestError, match="seed"):
        ingest(out, RESUME_SOURCE, "--block-cells", "256", "--resume", "--seed", "3")
    ingest(out, RESUME_SOURCE, "--block-cells", "256", "--resume")
    _same_copy(out, reference_copy, read_copy)


def test_two_workers_equal_single_worker(reference_copy, tmp_path, read_copy):
    out = tmp_path / "copy"
    ingest(out, RESUME_SOURCE, "--block-cells", "256", "--workers", "2", "--worker-index", "0")
    assert not (out / "manifest.json").exists()
    done = sorted(p.name for p in (out / ".progress").glob("block_*.done"))
    assert done == [f"block_{b:06d}.done" for b in (0, 2, 4)]
    with pytest.raises(IngestError, match=r"3 blocks not written.*--resume"):
        ingest(out, RESUME_SOURCE, "--finalize")
    ingest(out, RESUME_SOURCE, "--block-cells", "256", "--workers", "2", "--worker-index", "1")
    _same_copy(out, reference_copy, read_copy)
    assert json.loads((out / "manifest.json").read_text())["n_cells"] == 1500


@pytest.mark.parametrize("workers", [2, 3])
def test_concurrent_workers_equal_single_worker(reference_copy, tmp_path, read_copy, workers):
    """K worker processes at once (they race on the plan, the spill and the row store layout)."""
    out = tmp_path / "copy"
    base = [
        sys.executable,
        str(REPO / "launchers" / "ingest.py"),
        "--source",
        RESUME_SOURCE,
        "--out",
        str(out),
        "--block-cells",
        "256",
        "--workers",
        str(workers),
        "--log-level",
        "WARNING",
    ]
    procs = [
        subprocess.Popen([*base, "--worker-index", str(i)], cwd=REPO, stderr=subprocess.PIPE)
        for i in range(workers)
    ]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * workers, errors
    _same_copy(out, reference_copy, read_copy)
    _same_batches(out, reference_copy)


def test_resume_after_exception_mid_gather(reference_copy, tmp_path, read_copy, monkeypatch):
    # A worker dies inside a block's row write, after garbage reached the store: the rerun with
    # --resume must rewrite that block rather than trust the partial part.
    out, args = tmp_path / "copy", ["--block-cells", "256", "--workers", "2"]
    real_put, calls = RowWriter._put, []

    def crash_in_second_block(self, name, index, values):
        calls.append(name)
        if calls.count("counts") == 2:  # block 2: indptr and genes written, counts half-way
            real_put(self, name, index, np.full_like(values, 7777))
            raise RuntimeError("simulated crash")
        real_put(self, name, index, values)

    monkeypatch.setattr(RowWriter, "_put", crash_in_second_block)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest(out, RESUME_SOURCE, *args, "--worker-index", "0")
    monkeypatch.setattr(RowWriter, "_put", real_put)
    prog = out / ".progress"
    assert sorted(p.name for p in prog.glob("*_00000[02].done")) == [
        "block_000000.done",
        "rows_000000.done",
    ]
    assert 7777 in np.load(out / "rows" / "counts.npy")  # the partial part is on disk
    ingest(out, RESUME_SOURCE, *args, "--worker-index", "1")  # no manifest: block 2 missing
    assert not (out / "manifest.json").exists()
    ingest(out, RESUME_SOURCE, *args, "--worker-index", "0", "--resume")
    _same_copy(out, reference_copy, read_copy)


def test_worker_without_row_store_is_filled_at_finalize(reference_copy, tmp_path, read_copy):
    out, args = tmp_path / "copy", ["--block-cells", "256", "--workers", "2"]
    ingest(out, RESUME_SOURCE, *args, "--worker-index", "0", "--no-row-store")
    assert not (out / "rows").exists()  # layout comes from the first worker that writes rows
    ingest(out, RESUME_SOURCE, *args, "--worker-index", "1")
    _same_copy(out, reference_copy, read_copy)


def test_no_row_store_then_rowstore_command(reference_copy, tmp_path, read_copy):
    out = ingest(tmp_path / "copy", RESUME_SOURCE, "--block-cells", "256", "--no-row-store")
    assert not (out / "rows").exists()
    rowstore_main([str(out), "--block-cells", "256"])  # the serial build of old copies
    _same_copy(out, reference_copy, read_copy)


def test_spill_without_row_stats_gives_the_same_copy(reference_copy, tmp_path, read_copy):
    """A scatter pass from before rowstats.npy existed: the stats are derived from the spill."""
    out, args = tmp_path / "copy", ["--block-cells", "256"]
    ingest(out, RESUME_SOURCE, *args, "--max-blocks", "0")  # scatter only
    stats = sorted((out / ".progress" / "spill").glob("*.rowstats.npy"))
    assert len(stats) == 6
    expected = shuffle_spill.row_stats(out, json.loads((out / ".progress/plan.json").read_text()))
    for path in stats:
        path.unlink()
    ingest(out, RESUME_SOURCE, *args, "--resume")
    assert json.loads((out / "rows" / "layout.json").read_text())["offsets"][1:] == list(
        np.cumsum(expected[0])
    )
    _same_copy(out, reference_copy, read_copy)


def test_h5ad_folder_registers_and_appends(tmp_path, read_copy):
    folder = tmp_path / "h5ads"
    folder.mkdir()
    a, b = _bad_adata("ok"), _bad_adata("ok")
    b = b[:25, 4:].copy()  # fewer cells, partly different genes: var is the union
    b.X = b.X * 2
    a.write_h5ad(folder / "part_a.h5ad")
    b.write_h5ad(folder / "part_b.h5ad")
    X, obs, var, _, manifest = read_copy(ingest(tmp_path / "c", folder, "--obs-columns", "obs_id"))
    assert manifest["n_cells"] == 65 and sorted(var["feature_id"]) == sorted(a.var["feature_id"])
    assert obs["dataset_id"].value_counts().to_dict() == {"part_a": 40, "part_b": 25}
    col = {f: j for j, f in enumerate(var["feature_id"])}
    for k, obs_id in enumerate(obs["obs_id"]):
        file_index, name = obs_id.split(":")
        src = (a, b)[int(file_index)]
        want = np.zeros(len(var))
        want[[col[f] for f in src.var["feature_id"]]] = src[name].X.toarray().ravel()
        np.testing.assert_array_equal(X[k].toarray().ravel(), want)


def test_soma_experiment_source(pbmc_copy, tmp_path, read_copy):
    src = pbmc_copy / "experiment"  # any SOMA experiment path is read directly
    with pytest.raises(IngestError, match="x-layer"):
        ingest(tmp_path / "bad", src, "--x-layer", "counts")
    with pytest.raises(IngestError, match="nnz"):
        ingest(tmp_path / "bad2", src, "--obs-columns", "nnz")
    X1, obs1, _, side1, _ = read_copy(pbmc_copy)
    X2, obs2, _, side2, manifest = read_copy(ingest(tmp_path / "c", src, "--seed", "3"))
    rows = side2["source_joinid"]
    assert manifest["source"]["kind"] == "soma" and abs(X2 - X1[rows]).sum() == 0
    np.testing.assert_array_equal(side2["library_size"], side1["library_size"][rows])
    np.testing.assert_array_equal(obs2["cell_type"], obs1["cell_type"].to_numpy()[rows])


def test_command_reports_bad_source_with_exit_code(tmp_path, caplog, capsys):
    from atlasldm.data.ingest import main

    assert main(["--source", "builtin:nope", "--out", str(tmp_path / "c")]) == 2
    assert "builtin:pbmc68k" in caplog.text  # the message lists what is available
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown builtin source 'builtin:nope'")


def test_progress_lines_when_stderr_is_a_file(tmp_path):
    """SLURM/nohup: no terminal, so each pass logs lines with its cell count and rate."""
    log = tmp_path / "ingest.log"
    cmd = [sys.executable, str(REPO / "launchers" / "ingest.py"), "--source", RESUME_SOURCE]
    with open(log, "w") as stderr:
        done = subprocess.run(
            [*cmd, "--out", str(tmp_path / "copy"), "--block-cells", "256"],
            cwd=REPO,
            stderr=stderr,
            stdout=subprocess.DEVNULL,
            timeout=300,
        )
    text = log.read_text()
    assert done.returncode == 0, text
    for stage in ("scatter", "gather"):
        line = next((ln for ln in text.splitlines() if ln.startswith(f"ingest {stage} w0:")), "")
        assert "1,500/1,500 cells (100%)" in line and "cells/s" in line, text
    assert "\r" not in text  # no bar redraws in a log file

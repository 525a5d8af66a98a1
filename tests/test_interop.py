"""Interop: generated SOMA in the Census layout, settings as a dict, where copies may live.

The SOMA checks use `tiledbsoma.io.to_anndata` with its plain defaults, as a Census user would,
against the installed tiledbsoma; the offline checks run the commands in real processes whose
HTTP(S) traffic goes to a closed local port, so they hold on a machine with network access too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tiledbsoma
import tiledbsoma.io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlasldm.data.config import DataConfig
from atlasldm.data.source_check import DataSourceError, check_source
from atlasldm.data.stream import CellStream
from atlasldm.data.validate import IngestError
from atlasldm.data.vocab import GeneVocab
from atlasldm.generation.plan import Plan
from atlasldm.generation.writers import (
    Part,
    assemble,
    create_soma,
    finish_soma,
    settings_tree,
    write_h5ad_atomic,
    write_soma_part,
    write_uns,
)

REPO = Path(__file__).resolve().parents[1]
# Every HTTP(S) request goes to a proxy on a closed local port: no network, on any machine.
OFFLINE = {
    key: value
    for name in ("http_proxy", "https_proxy", "all_proxy")
    for key, value in ((name, "http://127.0.0.1:9"), (name.upper(), "http://127.0.0.1:9"))
} | {"no_proxy": "", "NO_PROXY": ""}

SETTINGS = {
    "vae": Path("/runs/vae/export"),  # a path: stored as its text
    "denoiser": None,  # no denoiser: left out
    "classifiers": {},
    "guidance": {"cfg_weights": {"cell_type": 2.0}, "t_min": 0.05, "cfg_mode": ""},
    "flow": {"sampler": "euler", "num_steps": 4},
    "seeds": [0, 1, 2],
    "attributes": ["cell_type", "tissue"],
    "n_cells": np.int64(6),
    "seconds": 1.25,
    "generated_is_normalized": False,
}


def plain(value):
    """numpy arrays and scalars as Python lists and scalars, for comparing read-back trees."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    return value.item() if isinstance(value, np.generic) else value


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The same 6 generated cells written as .h5ad and as SOMA (two parts, like two batches)."""
    rng = np.random.default_rng(0)
    n, g, width = 6, 5, 3
    plan = Plan(
        values={"cell_type": np.array(["B", "T", "B", "T", "NK", "NK"])},
        library_size=rng.uniform(100, 200, n),
        seed=np.zeros(n, dtype=np.int64),
        library_source="fixed",
    )
    genes = pd.DataFrame({"feature_id": [f"ENSG{i:04d}" for i in range(g)]})
    genes["feature_name"] = [f"GENE{i}" for i in range(g)]
    counts = sp.csr_matrix(rng.poisson(2.0, (n, g)).astype(np.float32))
    means = rng.uniform(0, 3, (n, g)).astype(np.float32)
    latents = rng.normal(size=(n, width)).astype(np.float32)
    parts = [
        Part(rows, counts[rows], means[rows], latents[rows])
        for rows in (np.arange(0, 4), np.arange(4, 6))
    ]
    folder = tmp_path_factory.mktemp("generated")
    h5ad = write_h5ad_atomic(assemble(parts, plan, genes, SETTINGS), folder / "gen.h5ad")
    out = folder / "gen_soma"
    create_soma(out, plan, genes, width, means=True)
    for part in reversed(parts):  # any order, as ranks finish
        write_soma_part(out, plan, part)
    finish_soma(out, SETTINGS)
    return ad.read_h5ad(h5ad), out, counts, means


def test_soma_output_reads_with_plain_to_anndata_defaults(generated):
    h5, out, counts, _ = generated
    with tiledbsoma.Experiment.open(str(out)) as exp:
        back = tiledbsoma.io.to_anndata(exp, "RNA")  # no X layer name, no id columns
    assert back.X is not None and (sp.csr_matrix(back.X) != counts).nnz == 0
    assert list(back.var_names) == [f"ENSG{i:04d}" for i in range(5)]
    assert list(back.var["feature_name"]) == list(h5.var["feature_name"])
    assert list(back.obs_names) == list(h5.obs_names)
    assert list(back.obs["cell_type"]) == list(h5.obs["cell_type"].astype(str))
    np.testing.assert_array_equal(back.obsm["latent"], h5.obsm["latent"])
    assert plain(back.uns["generation"]) == plain(h5.uns["generation"])
    assert back.uns["generated_is_normalized"] == h5.uns["generated_is_normalized"] is False


def test_soma_output_has_the_census_layout(generated):
    h5, out, counts, means = generated
    with tiledbsoma.Experiment.open(str(out)) as exp:
        assert sorted(exp.ms["RNA"].X) == ["data", "means", "raw"]
        assert exp.ms["RNA"].X["data"].uri == exp.ms["RNA"].X["raw"].uri  # one array, no copy
        var = exp.ms["RNA"].var.read().concat().to_pandas()
        assert list(var.columns) == ["soma_joinid", "feature_id", "feature_name"]
        census_style = tiledbsoma.io.to_anndata(
            exp, "RNA", X_layer_name="raw", var_id_name="feature_id", extra_X_layer_names=["means"]
        )
    assert (sp.csr_matrix(census_style.X) != counts).nnz == 0
    np.testing.assert_array_equal(census_style.layers["means"], means)
    assert list(census_style.var_names) == list(h5.var_names)
    assert not any(out.parent.glob(f".{out.name}.tmp*"))


def test_settings_are_a_dict_in_h5ad_and_soma(generated):
    h5, out, _, _ = generated
    settings_h5 = h5.uns["generation"]
    assert isinstance(settings_h5, dict) and "denoiser" not in settings_h5  # None: left out
    assert settings_h5["vae"] == "/runs/vae/export" and settings_h5["classifiers"] == {}
    assert plain(settings_h5) == plain(settings_tree(SETTINGS))
    assert plain(settings_h5["guidance"]) == {
        "cfg_weights": {"cell_type": 2.0},
        "t_min": 0.05,
        "cfg_mode": "",
    }
    assert (out / "generation.json").is_file()  # still beside the experiment, as before


# Nested settings of the kinds a run records: dicts, numbers, strings, lists, None.
KEYS = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(
    lambda k: not k.startswith("soma")
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False, width=64)
    | st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=12)
)
TREES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=st.dictionaries(KEYS, TREES, max_size=5))
def test_any_settings_read_back_the_same_from_h5ad_and_soma(tree, tmp_path_factory):
    expected = settings_tree(tree)
    folder = tmp_path_factory.mktemp("tree")
    adata = ad.AnnData(np.zeros((1, 1), dtype=np.float32))
    adata.uns["generation"] = expected
    adata.write_h5ad(folder / "t.h5ad")
    uri = str(folder / "soma")
    tiledbsoma.io.from_anndata(uri, ad.AnnData(np.zeros((1, 1), dtype=np.float32)), "RNA")
    with tiledbsoma.Experiment.open(uri, mode="w") as exp:
        write_uns(exp.ms["RNA"].add_new_collection("uns"), {"generation": expected})
    with tiledbsoma.Experiment.open(uri) as exp:
        soma_back = tiledbsoma.io.to_anndata(exp, "RNA").uns
    assert plain(ad.read_h5ad(folder / "t.h5ad").uns["generation"]) == plain(expected)
    assert plain(soma_back["generation"]) == plain(expected)


def test_ingest_without_network_says_so_in_one_line(tmp_path):
    out = tmp_path / "new" / "copy"
    cmd = [sys.executable, "-m", "atlasldm.data.ingest", "--source", "census:2025-11-08"]
    done = subprocess.run(
        [*cmd, "--out", str(out)],
        cwd=REPO,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: census:2025-11-08: ") and "network access" in lines[0]
    assert "--census-uri" in lines[0]  # the way to a local copy
    assert not (tmp_path / "new").exists()  # nothing written


def test_direct_census_without_network_says_so_in_one_line(tmp_path):
    genes = tmp_path / "genes.txt"
    genes.write_text("ENSG0001\nENSG0002\n")
    code = (
        "import sys\n"
        "from atlasldm.data.source_check import DataSourceError, check_source\n"
        "try:\n"
        f"    check_source('census:2025-11-08', 'direct', {str(genes)!r})\n"
        "except DataSourceError as err:\n"
        "    sys.exit(f'error: {err}')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "data.source=census:2025-11-08" in lines[0] and "network access" in lines[0]
    assert "data.source=DIR/census_data/homo_sapiens" in lines[0]


@pytest.mark.parametrize("source", ["s3://bucket/copies/census_human", "census:2025-11-08"])
def test_a_training_copy_is_a_filesystem_path(source):
    with pytest.raises(DataSourceError) as err:
        check_source(source, "copy")
    message = str(err.value)
    assert "\n" not in message and source in message and "data.mode=direct" in message
    with pytest.raises(DataSourceError, match="data.mode=direct"):
        CellStream(DataConfig(source=source, micro_batch=8), "all", 0, 1)  # the Python API too


def test_ingest_refuses_an_output_uri_or_file(tmp_path, capsys):
    from atlasldm.data.ingest import main

    assert main(["--source", "builtin:pbmc68k", "--out", "s3://bucket/copy"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: --out s3://bucket/copy") and "POSIX" in line
    assert not Path("s3:").exists()
    (tmp_path / "notes.txt").write_text("mine\n")
    assert main(["--source", "builtin:pbmc68k", "--out", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt is a file" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def _direct_batches(experiment: Path, vocab: Path) -> list:
    cfg = DataConfig(source=str(experiment), mode="direct", vocab_path=str(vocab), micro_batch=64)
    stream = CellStream(cfg, "all", 0, 1)
    try:
        return list(stream.iter_eval())
    finally:
        stream.close()


def test_direct_mode_takes_a_plain_gene_list(pbmc_copy, tmp_path):
    vocab = GeneVocab.load(pbmc_copy / "genes.tsv")
    plain_list = tmp_path / "genes.txt"
    plain_list.write_text("".join(f"{fid}\n" for fid in vocab.feature_ids))
    check_source(str(pbmc_copy / "experiment"), "direct", str(plain_list))
    got = _direct_batches(pbmc_copy / "experiment", plain_list)
    want = _direct_batches(pbmc_copy / "experiment", pbmc_copy / "genes.tsv")
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert a.gene_ids.equal(b.gene_ids) and a.counts.equal(b.counts)


def test_direct_mode_errors_name_the_path(tmp_path, pbmc_copy):
    missing = tmp_path / "no_such_experiment"
    with pytest.raises(IngestError) as err:
        _direct_batches(missing, pbmc_copy / "genes.tsv")
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)
    folder = tmp_path / "plain_folder"
    folder.mkdir()
    with pytest.raises(IngestError, match=f"{folder} is not a SOMA experiment"):
        _direct_batches(folder, pbmc_copy / "genes.tsv")
    dup = tmp_path / "dup.txt"
    dup.write_text("ENSG1\nENSG1\n")
    with pytest.raises(DataSourceError, match=f"{dup}.*duplicate"):
        check_source(str(pbmc_copy / "experiment"), "direct", str(dup))

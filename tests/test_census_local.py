"""The census source (ingest and direct mode) against a local folder with the Census structure,
with cellxgene_census's release directory replaced by one that points at it (no network)."""

from pathlib import Path

import cellxgene_census
import numpy as np
import pytest
import scipy.sparse as sp
import tiledbsoma

from atlasldm.data import soma
from atlasldm.data.config import DataConfig
from atlasldm.data.ingest import run_ingest
from atlasldm.data.source_check import DataSourceError, check_source
from atlasldm.data.stream import CellStream
from atlasldm.data.synthetic import write_synthetic_experiment
from atlasldm.data.validate import IngestError


def write_census_folder(root: Path, spec: str) -> str:
    """Write a folder with the Census structure: a SOMA Collection holding
    `census_data/homo_sapiens`, a Census-layout synthetic experiment. `open_soma(uri=root)`
    opens it; it needs no `census_info`. Returns the root URI.
    """
    exp_uri = root / "census_data" / "homo_sapiens"
    root.mkdir(parents=True)
    with tiledbsoma.Collection.create(str(root)) as coll:
        coll.add_new_collection("census_data")
    write_synthetic_experiment(exp_uri, spec)
    with tiledbsoma.Collection.open(str(root / "census_data"), mode="w") as data:
        data.set("homo_sapiens", tiledbsoma.Experiment.open(str(exp_uri)), use_relative_uri=True)
    return str(root)


@pytest.fixture(scope="module")
def census_root(tmp_path_factory):
    spec = "cells=600,genes=40,datasets=3,cell_types=3,seed=4"
    return write_census_folder(tmp_path_factory.mktemp("census") / "soma", spec)


@pytest.fixture(scope="module")
def census_source(census_root):
    """Obs and X of census_data/homo_sapiens, read through cellxgene_census.open_soma(uri=...)."""
    with cellxgene_census.open_soma(uri=census_root) as census:
        exp = census["census_data"]["homo_sapiens"]
        obs = exp.obs.read().concat().to_pandas().set_index("soma_joinid").sort_index()
        n, g = exp.obs.count, exp.ms["RNA"].var.count
        X = soma.read_csr(exp.ms["RNA"].X["raw"], np.arange(n), np.arange(g))
    return obs, X


def _ingest(read_copy, root, out, *extra):
    argv = ["--source", "census", "--census-uri", root, "--out", str(out)]
    run_ingest([*argv, "--block-cells", "100", "--log-level", "WARNING", *extra])
    return read_copy(out)


def test_census_ingest_with_filter(census_root, census_source, tmp_path, read_copy):
    obs, X_src = census_source
    expr = "is_primary_data == True and dataset_id == 'dataset_001'"
    X, copy_obs, _, side, manifest = _ingest(
        read_copy, census_root, tmp_path / "c", "--obs-filter", expr
    )
    want = obs.index[obs["is_primary_data"] & (obs["dataset_id"] == "dataset_001")]
    assert 0 < manifest["n_cells"] == len(want) < len(obs)
    assert sorted(side["source_joinid"].tolist()) == sorted(want.tolist())
    assert manifest["obs_filter"] == expr and manifest["source"]["kind"] == "census"
    assert abs(X - sp.csr_matrix(X_src)[side["source_joinid"]]).sum() == 0
    assert set(copy_obs["dataset_id"]) == {"dataset_001"}


def test_census_default_filter_and_gene_subset(census_root, census_source, tmp_path, read_copy):
    obs, X_src = census_source
    genes = tmp_path / "genes.txt"
    genes.write_text("ENSG00000000005\nENSG00000000031\n")
    X, _, var, side, manifest = _ingest(
        read_copy, census_root, tmp_path / "c", "--genes", str(genes)
    )
    assert manifest["obs_filter"] == "is_primary_data == True"
    assert manifest["n_cells"] == int(obs["is_primary_data"].sum())
    assert var["feature_id"].tolist() == ["ENSG00000000005", "ENSG00000000031"]
    src = side["source_joinid"]
    assert abs(X - sp.csr_matrix(X_src)[src][:, [5, 31]]).sum() == 0
    # library size is over ALL source genes, not only the kept ones
    np.testing.assert_array_equal(side["library_size"], obs["raw_sum"].to_numpy()[src])


def test_census_bad_organism_and_gene_list(census_root, tmp_path, read_copy):
    with pytest.raises(IngestError, match="mus_musculus.*homo_sapiens"):
        _ingest(read_copy, census_root, tmp_path / "c", "--organism", "mus_musculus")
    genes = tmp_path / "genes.txt"
    genes.write_text("ENSG00000000005\nENSG_NOT_THERE\n")
    with pytest.raises(IngestError, match="ENSG_NOT_THERE.*--genes"):
        _ingest(read_copy, census_root, tmp_path / "d", "--genes", str(genes))
    assert not (tmp_path / "d" / "manifest.json").exists()


@pytest.fixture
def census_directory(monkeypatch, census_root):
    """cellxgene_census's release directory, offline: version 2099-01-01 lives in census_root.

    Returns a function that switches between the two locator styles the directory uses (an
    absolute `uri`, or a `relative_uri` under the default mirror, here the folder `mirror`)."""

    def use(style: str, mirror: Path | None = None) -> None:
        if style == "uri":
            locator = {"uri": f"{census_root}/", "s3_region": "us-west-2"}
        else:  # the mirror holds <version>/soma, as the Census bucket does
            (mirror / "2099-01-01").mkdir()
            (mirror / "2099-01-01" / "soma").symlink_to(census_root)
            locator = {"relative_uri": "/2099-01-01/soma/"}
            mirrors = {"default": "local", "local": {"base_uri": str(mirror), "region": None}}
            monkeypatch.setattr(cellxgene_census, "get_census_mirror_directory", lambda: mirrors)

        def describe(version):
            if version != "2099-01-01":
                raise ValueError(f"Unable to locate Census version: {version}.")
            return {"soma": locator}

        monkeypatch.setattr(cellxgene_census, "get_census_version_description", describe)
        soma.resolve_census.cache_clear()

    yield use
    soma.resolve_census.cache_clear()


def _batches(source: str, vocab: Path) -> list:
    cfg = DataConfig(source=source, mode="direct", vocab_path=str(vocab), micro_batch=50)
    stream = CellStream(cfg, "all", 0, 1)
    try:
        return list(stream.iter_eval())
    finally:
        stream.close()


@pytest.mark.parametrize("style", ["uri", "relative_uri"])
def test_direct_mode_reads_census_version(census_root, census_directory, tmp_path, style):
    census_directory(style, tmp_path)
    exp = Path(census_root) / "census_data" / "homo_sapiens"
    uri, config = soma.resolve_census("census:2099-01-01")
    assert Path(uri).resolve() == exp.resolve() and config["vfs.s3.no_sign_request"] == "true"
    genes = tmp_path / "genes.txt"
    genes.write_text("".join(f"ENSG{i:011d}\n" for i in range(40)))
    check_source("census:2099-01-01", "direct", str(genes))
    got, want = _batches("census:2099-01-01", genes), _batches(str(exp), genes)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert a.soma_joinid.equal(b.soma_joinid) and a.counts.equal(b.counts)


def test_census_errors_are_one_line(census_root, census_directory, tmp_path, read_copy):
    census_directory("uri")
    genes = tmp_path / "genes.txt"
    genes.write_text("ENSG00000000001\n")
    with pytest.raises(DataSourceError) as err:
        check_source("census:1999-01-01", "direct", str(genes))
    assert "census:1999-01-01: no such Census version" in str(err.value)
    missing = tmp_path / "no_census"
    with pytest.raises(IngestError, match=f"--census-uri {missing} does not exist"):
        _ingest(read_copy, str(missing), tmp_path / "c")
    assert not (tmp_path / "c").exists()  # a refused ingest leaves no folder

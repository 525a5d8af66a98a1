"""Synthetic NB generator and its Census-layout SOMA experiment."""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats
import tiledbsoma

from atlasldm.data import soma, synthetic
from atlasldm.data.synthetic import (
    GEN_BLOCK,
    _sample_nb,
    generate_anndata,
    generate_block,
    parse_spec,
    write_synthetic_experiment,
)

SPEC = "synthetic:cells=2500,genes=120,datasets=4,cell_types=5,seed=7"


def test_parse_spec_reads_values_and_rejects_typos():
    spec = parse_spec(SPEC)
    assert (spec.cells, spec.genes, spec.datasets, spec.cell_types, spec.seed) == (
        2500,
        120,
        4,
        5,
        7,
    )
    with pytest.raises(ValueError, match="celss"):
        parse_spec("celss=10")


def test_reproducible_for_seed_and_different_across_seeds():
    spec = parse_spec(SPEC)
    X1, obs1 = generate_block(spec, 1)
    X2, obs2 = generate_block(spec, 1)
    assert (X1 != X2).nnz == 0 and obs1.equals(obs2)
    X3, _ = generate_block(parse_spec(SPEC.replace("seed=7", "seed=8")), 1)
    assert (X1 != X3).nnz > 0


def test_nb_inverse_cdf_matches_scipy_ppf():
    rng = np.random.default_rng(0)
    mu = rng.uniform(0.1, 50.0, 2000)
    r = rng.uniform(0.3, 5.0, 2000)
    p0 = (r / (r + mu)) ** r
    u = p0 + (1 - p0) * rng.uniform(0.01, 0.99, 2000)  # the sampler's domain: u above P(0)
    ref = scipy.stats.nbinom.ppf(u, r, r / (r + mu))
    got = _sample_nb(u, mu, r)
    assert np.mean(got == ref) > 0.999  # ties at exact CDF steps may differ by float rounding


def test_dataset_blocks_contiguous_sparsity_and_library(tmp_path):
    spec = parse_spec(SPEC)
    adata = generate_anndata(spec)
    ds = adata.obs["dataset_id"].to_numpy()
    runs = 1 + int((ds[1:] != ds[:-1]).sum())
    assert runs == len(set(ds)) == spec.datasets  # each dataset one contiguous block
    X = sp.csr_matrix(adata.X)
    density = X.nnz / (X.shape[0] * X.shape[1])
    assert 0.05 <= density <= 0.15
    assert np.all(X.data == np.round(X.data)) and X.data.min() > 0
    np.testing.assert_array_equal(adata.obs["raw_sum"], np.asarray(X.sum(axis=1)).ravel())
    np.testing.assert_array_equal(adata.obs["nnz"], np.diff(X.indptr))


def test_realistic_library_and_sparsity_at_20k_genes():
    spec = parse_spec("cells=300,genes=20000,datasets=2,cell_types=4,seed=1")
    X, obs = generate_block(spec, 0)
    assert 2000 <= np.median(obs["raw_sum"]) <= 5000
    assert 0.05 <= X.nnz / (X.shape[0] * X.shape[1]) <= 0.15


@pytest.mark.parametrize("workers", [1, 2])
def test_written_experiment_equals_generator_and_is_reused(tmp_path, monkeypatch, workers):
    """The same array whether chunks are generated here or by worker processes (spawned)."""
    monkeypatch.setattr(synthetic, "PARALLEL_MIN_BLOCKS", 1)  # 3 blocks: the pool path too
    spec = parse_spec(SPEC)
    uri = write_synthetic_experiment(
        tmp_path / "exp", spec, block_cells=GEN_BLOCK, zstd_level=1, workers=workers
    )
    ref = generate_anndata(spec)
    with tiledbsoma.Experiment.open(uri) as exp:
        n, g = spec.cells, spec.genes
        X = soma.read_csr(exp.ms["RNA"].X["raw"], np.arange(n), np.arange(g))
        obs = exp.obs.read().concat().to_pandas()
        var = exp.ms["RNA"].var.read().concat().to_pandas()
        platform = exp.ms["RNA"].X["raw"].schema_config_options()
    assert abs(X - sp.csr_matrix(ref.X)).sum() == 0  # write chunking does not change the data
    assert obs["dataset_id"].tolist() == ref.obs["dataset_id"].tolist()
    assert obs["is_primary_data"].dtype == bool and var["feature_id"].is_unique
    np.testing.assert_array_equal(var["nnz"], np.diff(X.tocsc().indptr))
    assert platform.capacity == 65536
    marker = tmp_path / "exp.complete.json"
    stamp = marker.stat().st_mtime_ns
    assert write_synthetic_experiment(tmp_path / "exp", spec) == uri
    assert marker.stat().st_mtime_ns == stamp  # reused, not rewritten

"""The gap decomposition's sets (generation/decomposition.py) and the tables that read them.

The VAE is a small random-weight export (tests/test_generate.py), so the checks are about what
each set is made of: the right cells and labels, the right means, the right noise, reproducibly.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_generate import CELL_TYPES, G, write_vae

from atlasldm.generation.api import load_pretrained
from atlasldm.generation.decomposition import (
    decomposition_sets,
    nb_resample,
    reconstructions,
    smoothed_profiles,
)
from atlasldm.pipeline.e2e_tables import decomposition_table, stage_lines, stage_losses


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return load_pretrained(write_vae(tmp_path_factory.mktemp("vae") / "vae"), device="cpu")


def _cells(n: int = 24, seed: int = 0, genes=None) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    labels = np.resize(CELL_TYPES, n)
    X = rng.poisson(rng.gamma(2.0, 3.0, (n, G))).astype(np.float32)
    X[:, 0] += 1  # every cell expresses something
    var = pd.DataFrame(index=genes or [f"ENSG{i:05d}" for i in range(G)])
    obs = pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var)


def test_one_neighbour_smooths_nothing() -> None:
    counts = _cells().X.toarray().astype(np.float64)
    np.testing.assert_allclose(
        smoothed_profiles(counts, k=1), counts / counts.sum(1, keepdims=True)
    )


@settings(max_examples=15, deadline=None)
@given(n=st.integers(6, 30), k=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_smoothing_is_permutation_equivariant_and_keeps_profiles(n, k, seed) -> None:
    counts = _cells(n, seed).X.toarray().astype(np.float64)
    perm = np.random.default_rng(seed).permutation(n)
    out = smoothed_profiles(counts, k)
    np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-9)
    # Same cells in another order: the same profiles, in that order (up to ties in distance).
    np.testing.assert_allclose(smoothed_profiles(counts[perm], k), out[perm], atol=1e-9)


def test_nb_resample_draws_around_the_smoothed_means(vae) -> None:
    cells = _cells(30)
    seeds = list(range(40))
    out = nb_resample(vae, cells, seeds)
    counts = cells.X.toarray().astype(np.float64)
    mu = smoothed_profiles(counts) * counts.sum(1, keepdims=True)
    drawn = out.X.toarray().reshape(len(seeds), *counts.shape)
    theta = np.exp(vae.exports.vae.decoder_head.log_theta(torch.arange(1, G + 1)).detach().numpy())
    # The mean of 40 draws sits within 5 standard errors of μ (NB variance μ + μ²/θ).
    se = np.sqrt((mu + mu**2 / theta) / len(seeds))
    z = (drawn.mean(0) - mu) / np.maximum(se, 1e-9)
    assert np.abs(z).max() < 5.5, np.abs(z).max()
    assert list(out.obs["cell_type"]) == list(cells.obs["cell_type"]) * len(seeds)
    assert list(out.obs["seed"]) == list(np.repeat(seeds, cells.n_obs))


def test_reconstructions_keep_cells_libraries_and_seeds(vae) -> None:
    # Genes in another order than the vocabulary: output columns follow the cells' own order.
    genes = [f"ENSG{i:05d}" for i in range(G)][::-1]
    cells = _cells(20, genes=genes)
    recon, means = reconstructions(vae, cells, [0, 1], batch_size=7)
    again, _ = reconstructions(vae, cells, [0, 1], batch_size=7)  # blocks key the draws
    assert list(recon.var_names) == genes and list(means.var_names) == genes
    np.testing.assert_array_equal(recon.X.toarray(), again.X.toarray())
    assert not np.array_equal(recon.X.toarray()[:20], recon.X.toarray()[20:])  # seeds differ
    # The means are log1p-CP10k of one profile per cell, the same at every seed.
    profile = np.expm1(means.X.toarray())
    np.testing.assert_allclose(profile.sum(1), 1e4, rtol=1e-4)
    np.testing.assert_allclose(means.X.toarray()[:20], means.X.toarray()[20:])
    assert means.uns["generated_is_normalized"]
    # Sampling is around the decoded means: across 60 seeds the library sizes average to ℓ.
    many, _ = reconstructions(vae, cells, list(range(60)))
    lib = cells.X.toarray().sum(1)
    mean_lib = many.X.toarray().sum(1).reshape(60, -1).mean(0)
    np.testing.assert_allclose(mean_lib, lib, rtol=0.15)


def test_decomposition_sets_refuse_genes_outside_the_vocabulary(vae) -> None:
    cells = _cells(8, genes=[f"OTHER{i}" for i in range(G)])
    with pytest.raises(ValueError, match="not in the VAE vocabulary"):
        decomposition_sets(vae, cells, [0])


def _report(values: dict[str, float]) -> dict:
    sets = {}
    for name, auc in values.items():
        summary = {key: {"value": auc, "sem": 0.01} for key in ("c2st_knn_auc", "w2")}
        summary.update({k: {"value": 0.5} for k in ("c2st_logreg_auc", "recall", "cond_accuracy")})
        sets[name] = {"summary": summary}
    return {"sets": sets}


def test_stage_losses_name_the_stage_that_adds_most() -> None:
    report = _report(
        {
            "real_floor": 0.48,
            "nb_resample": 0.55,
            "vae_recon": 0.70,
            "scldm": 0.73,
            "scldm_genlib": 0.74,
            "vae_means": 0.99,
        }
    )
    losses = stage_losses(report)
    assert losses == pytest.approx(
        {"NB noise model": 0.07, "VAE": 0.15, "latent generator": 0.03, "library sizes": 0.01}
    )
    assert stage_lines(report)[-1] == "largest loss: VAE (+0.150)"
    table = decomposition_table(report)
    rows = [line.split(" | ")[0] for line in table.splitlines()[2:]]
    assert rows == [
        "| real_floor",
        "| nb_resample",
        "| vae_means",
        "| vae_recon",
        "| scldm",
        "| scldm_genlib",
    ]
    assert decomposition_table(_report({"real_floor": 0.5, "scldm": 0.7})) == ""

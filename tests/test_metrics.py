"""Each evaluation metric against a closed form or a brute-force reference on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from atlasldm.evaluation.distances import (
    energy_distance,
    frechet_distance,
    mmd2_unbiased,
    mmd_scdiffusion,
    rbf_mmd2_biased,
    wasserstein,
)
from atlasldm.evaluation.fixtures import carve_floor, gene_shuffled_counts, stratified_split
from atlasldm.evaluation.genes import gene_fidelity, r2_score_real_target
from atlasldm.evaluation.prdc import prdc
from atlasldm.evaluation.preprocess import fit_projection, log1p_cp10k, select_hvgs
from atlasldm.evaluation.twosample import c2st_auc, one_nn_accuracy


def _pair(seed: int, m: int = 8, n: int = 8, d: int = 3, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, d)), rng.normal(size=(n, d)) + shift


@pytest.mark.parametrize("p", [1, 2])
def test_wasserstein_matches_brute_force_assignment(p: int) -> None:
    x, y = _pair(0)
    cost = cdist(x, y, "sqeuclidean" if p == 2 else "euclidean")
    rows, cols = linear_sum_assignment(cost)
    expected = cost[rows, cols].mean()
    expected = np.sqrt(expected) if p == 2 else expected
    got = wasserstein(x, y, p=p)
    assert got["method"] == "exact_emd" and got["epsilon"] is None
    assert got["value"] == pytest.approx(expected, rel=1e-9)


def test_wasserstein_switches_to_sinkhorn_and_reports_epsilon() -> None:
    x, y = _pair(1, shift=1.0)
    exact = wasserstein(x, y, p=2)["value"]
    approx = wasserstein(x, y, p=2, exact_max=4)
    assert approx["method"] == "sinkhorn" and approx["epsilon"] > 0
    # The entropic plan is feasible, so its transport cost cannot beat the exact optimum.
    assert exact - 1e-9 <= approx["value"] <= 1.2 * exact


def _k(a: np.ndarray, b: np.ndarray, sigmas: list[float]) -> float:
    return float(np.mean([np.exp(-np.sum((a - b) ** 2) / (2 * s**2)) for s in sigmas]))


def test_mmd2_unbiased_matches_double_loop() -> None:
    x, y = _pair(2, m=6, n=5)
    h = 1.3
    sig = [s * h for s in (0.25, 0.5, 1, 2, 4)]
    m, n = len(x), len(y)
    xx = sum(_k(x[i], x[j], sig) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(_k(y[i], y[j], sig) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(_k(x[i], y[j], sig) for i in range(m) for j in range(n)) / (m * n)
    assert mmd2_unbiased(x, y, h) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_mmd2_unbiased_is_zero_in_expectation_and_positive_when_shifted() -> None:
    same = [mmd2_unbiased(*_pair(s, 60, 60, 4), h=2.0) for s in range(20)]
    shifted = [mmd2_unbiased(*_pair(s, 60, 60, 4, shift=1.0), h=2.0) for s in range(5)]
    spread = np.std(same) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 3 * spread + 1e-4
    assert min(shifted) > max(same)


def test_rbf_mmd2_biased_matches_double_loop_with_truncation() -> None:
    x, y = _pair(3, m=7, n=5)
    sig = [0.01, 0.1, 1.0, 10.0, 100.0]
    xs = x[:5]  # CFGen cuts both sets to their first min(m, n) rows
    terms = [
        sum(_k(a[i], b[j], sig) * len(sig) for i in range(5) for j in range(5)) / 25
        for a, b in ((xs, xs), (y, y), (xs, y))
    ]
    assert rbf_mmd2_biased(x, y) == pytest.approx(terms[0] + terms[1] - 2 * terms[2], rel=1e-10)


def test_mmd_scdiffusion_matches_loop() -> None:
    x, y = _pair(4, m=5, n=5)
    pooled = np.concatenate([x, y])
    d = np.array([[np.sum((a - b) ** 2) for b in pooled] for a in pooled])
    base = d[~np.eye(10, dtype=bool)].mean()
    k = sum(np.exp(-d / (base / 4 * 2**i)) for i in range(5))
    expected = (k[:5, :5] + k[5:, 5:] - k[:5, 5:] - k[5:, :5]).mean()
    assert mmd_scdiffusion(x, y) == pytest.approx(expected, rel=1e-10)


def test_energy_distance_matches_definition() -> None:
    x, y = _pair(5, m=6, n=4)
    dist = lambda a, b: float(np.linalg.norm(a - b))  # noqa: E731
    m, n = len(x), len(y)
    exy = np.mean([dist(a, b) for a in x for b in y])
    exx = sum(dist(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    eyy = sum(dist(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    assert energy_distance(x, y) == pytest.approx(2 * exy - exx - eyy, rel=1e-10)


def _whitened(seed: int, n: int, d: int) -> np.ndarray:
    """Return rows with sample mean exactly 0 and sample covariance exactly I."""
    z = np.random.default_rng(seed).normal(size=(n, d))
    z -= z.mean(0)
    return z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T


def test_frechet_distance_matches_gaussian_closed_form() -> None:
    a, b = np.array([1.0, 2.0, 0.5]), np.array([0.5, 3.0, 1.0])
    mu_x, mu_y = np.array([0.0, 1.0, -1.0]), np.array([2.0, 0.0, 0.0])
    x = _whitened(0, 200, 3) * a + mu_x
    y = _whitened(1, 150, 3) * b + mu_y
    # Diagonal covariances commute, so Tr(Σx + Σy − 2(ΣxΣy)^½) = Σ (a − b)².
    expected = np.sum((mu_x - mu_y) ** 2) + np.sum((a - b) ** 2)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)


def _prdc_loops(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    def radius(s: np.ndarray, i: int) -> float:
        return sorted(np.linalg.norm(s[i] - t) for j, t in enumerate(s) if j != i)[k - 1]

    rr = [radius(real, i) for i in range(len(real))]
    fr = [radius(fake, j) for j in range(len(fake))]
    d = lambda a, b: np.linalg.norm(a - b)  # noqa: E731
    inside = [[d(r, f) < rr[i] for i, r in enumerate(real)] for f in fake]
    return {
        "precision": np.mean([any(row) for row in inside]),
        "recall": np.mean([any(d(r, f) < fr[j] for j, f in enumerate(fake)) for r in real]),
        "density": np.mean([sum(row) for row in inside]) / k,
        "coverage": np.mean([min(d(r, f) for f in fake) < rr[i] for i, r in enumerate(real)]),
    }


def test_prdc_matches_loops_and_subset_has_full_precision() -> None:
    real, fake = _pair(6, m=15, n=12, shift=0.5)
    got, ref = prdc(real, fake, k=3), _prdc_loops(real, fake, 3)
    assert got == pytest.approx(ref)
    subset = prdc(real, real[:8], k=3)
    assert subset["precision"] == 1.0  # every fake point is a real point: inside its own ball
    assert subset["coverage"] >= 8 / 15
    far = prdc(real, fake + 100.0, k=3)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


@pytest.mark.parametrize("clf", ["knn", "logreg"])
def test_c2st_auc_half_for_same_and_one_for_separated(clf: str) -> None:
    same = c2st_auc(*_pair(7, 150, 150, 5), classifier=clf)
    apart = c2st_auc(*_pair(8, 150, 150, 5, shift=4.0), classifier=clf)
    assert abs(same["value"] - 0.5) < 0.12 and same["n"] == 150
    assert apart["value"] > 0.97


def test_one_nn_accuracy_half_for_same_and_one_for_separated() -> None:
    assert abs(one_nn_accuracy(*_pair(9, 150, 150, 5))["value"] - 0.5) < 0.1
    assert one_nn_accuracy(*_pair(9, 100, 80, 5, shift=10.0)) == {"value": 1.0, "n": 80}


def test_log1p_cp10k_closed_form_and_zero_cells() -> None:
    counts = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    out = log1p_cp10k(counts)
    assert out[0] == pytest.approx(np.log1p([2500.0, 7500.0, 0.0]))
    assert np.all(out[1] == 0)


def test_r2_uses_real_as_target_and_gene_fidelity_is_perfect_on_itself() -> None:
    real, gen = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0])
    assert r2_score_real_target(real, gen) == pytest.approx(1 - 1 / 2)
    log = log1p_cp10k(np.random.default_rng(0).poisson(3.0, size=(30, 12)).astype(float))
    fid = gene_fidelity(log, log, np.arange(6), np.ones(30) * 5, np.ones(30) * 5)
    assert fid["all/mean_r2"] == 1.0 and fid["hvg/var_pcc"] == pytest.approx(1.0)
    assert fid["genecorr_frobenius"] == 0.0 and fid["libsize_log10_w1"] == 0.0


def test_seurat_v3_ranks_overdispersed_genes_first() -> None:
    rng = np.random.default_rng(0)
    means = np.exp(rng.uniform(-1, 3, size=60))
    counts = rng.poisson(means, size=(300, 60)).astype(float)
    noisy = [5, 17, 42]  # same means, but negative-binomial with strong over-dispersion
    counts[:, noisy] = rng.negative_binomial(0.5, 0.5 / (0.5 + means[noisy]), size=(300, 3))
    top = select_hvgs(counts, 3)
    assert set(top) == set(noisy)
    assert np.array_equal(top, select_hvgs(counts, 3))


def test_projection_modes_differ_by_the_mean_offset() -> None:
    x = np.random.default_rng(1).normal(size=(40, 10)) + 3.0
    proj = fit_projection(x, n_pcs=4)
    offset = proj.project(x, "uncentered_published") - proj.project(x, "centred")
    assert np.allclose(offset, proj.mean @ proj.components.T)


def test_split_helpers_keep_class_composition() -> None:
    labels = np.repeat(["a", "b", "c"], [30, 12, 9])
    test, train = stratified_split(labels, 1 / 3, seed=0)
    floor, ref = carve_floor(labels[train], labels[test], seed=0)
    assert len(np.intersect1d(test, train)) == 0 and len(test) + len(train) == len(labels)
    for c in "abc":
        assert np.sum(labels[train][floor] == c) == np.sum(labels[test] == c)
    assert len(np.intersect1d(floor, ref)) == 0


def test_gene_shuffle_keeps_each_column_multiset() -> None:
    counts = np.random.default_rng(2).poisson(2.0, size=(20, 5)).astype(float)
    shuffled = gene_shuffled_counts(counts, seed=0)
    assert np.array_equal(np.sort(shuffled, 0), np.sort(counts, 0))
    assert not np.array_equal(shuffled, counts)

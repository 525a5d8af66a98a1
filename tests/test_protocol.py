"""Orderings of docs/evaluation.md, "Floors and known-bad sets", on the pbmc68k fixture:
floor < Poisson-mean < gene-shuffled.

Split: stratified thirds (test / floor / reference). A 50/50 test split leaves no reference
cells once a test-sized floor is carved out of the training half (P0), so the training two
thirds are halved into a floor with the test's composition and the reference.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from atlasldm.evaluation.context import EvalConfig
from atlasldm.evaluation.fixtures import PBMC_LABEL_KEY, load_pbmc68k, pbmc68k_splits
from atlasldm.evaluation.protocol import align_genes, evaluate, make_set, summarize

HEADLINE = ("w2", "mmd2_u", "energy", "c2st_knn_auc")


@pytest.fixture(scope="module")
def results() -> dict:
    s = pbmc68k_splits(test_frac=1 / 3, seed=0)
    # 50 trees instead of 1,000 keeps the RF AUC cheap; one known-bad seed keeps this fast.
    config = EvalConfig(label_key=PBMC_LABEL_KEY, rf_trees=50, known_bad_seeds=(0,))
    return evaluate(s["reference"], s["test"], s["floor"], {}, config)


def _v(results: dict, name: str, key: str) -> float:
    return results["sets"][name]["summary"][key]["value"]


def test_fixture_counts_are_integers_with_documented_shape() -> None:
    a = load_pbmc68k()
    x = a.X.toarray()
    assert a.shape == (700, 765) and np.array_equal(x, np.round(x)) and x.min() >= 0
    assert a.obs[PBMC_LABEL_KEY].nunique() == 10


@pytest.mark.parametrize("key", HEADLINE)
def test_headline_orderings(results: dict, key: str) -> None:
    floor, pois, shuf = (
        _v(results, n, key) for n in ("real_floor", "poisson_mean", "gene_shuffled")
    )
    assert floor < pois < shuf


def test_logistic_c2st_sees_poisson_but_not_gene_shuffling(results: dict) -> None:
    # A linear classifier on PCs only sees shifts of the PC distribution's location. Gene
    # shuffling keeps every gene's mean, hence the PC means, so its LR AUC stays near 0.5
    # (0.48-0.54 over split seeds 0-3, sometimes below the floor); the nonlinear kNN C2ST is
    # the one that catches it. Robust here: floor ≈ 0.5 and Poisson-mean above both.
    floor, pois, shuf = (
        _v(results, n, "c2st_logreg_auc") for n in ("real_floor", "poisson_mean", "gene_shuffled")
    )
    assert abs(floor - 0.5) < 0.1 and abs(shuf - 0.5) < 0.1
    assert pois > max(floor, shuf) + 0.1


def test_floor_is_near_zero_for_unbiased_estimators(results: dict) -> None:
    assert abs(_v(results, "real_floor", "mmd2_u")) < 0.1 * _v(results, "poisson_mean", "mmd2_u")
    assert abs(_v(results, "real_floor", "c2st_knn_auc") - 0.5) < 0.1


def test_documented_pitfalls_hold(results: dict) -> None:
    sets = results["sets"]
    a = {n: sets[n]["per_seed"][0]["block_a"] for n in sets}
    # Pitfall 5: gene-mean correlation cannot see destroyed structure.
    assert a["gene_shuffled"]["scdiffusion"]["pcc"] > 0.98
    # Pitfall 6: a prototype sampler beats real cells on classifier accuracy; shuffling does not.
    acc = {n: _v(results, n, "cond_accuracy") for n in sets}
    assert acc["poisson_mean"] > acc["real_floor"] > acc["gene_shuffled"]
    # Pitfall 1: the uncentred projection inflates W2 for every set.
    for n in sets:
        cm = a[n]["cfgen"]["class_mean"]
        assert cm["w2_uncentered_published"]["mean"] > cm["w2_centred"]["mean"]


def test_block_a_orderings_of_the_design_table(results: dict) -> None:
    names = ("real_floor", "poisson_mean", "gene_shuffled")
    sd = [results["sets"][n]["per_seed"][0]["block_a"]["scdiffusion"] for n in names]
    assert sd[0]["mmd_5kernel"] < sd[1]["mmd_5kernel"] < sd[2]["mmd_5kernel"]
    assert sd[0]["rf_auc"] < sd[1]["rf_auc"] < sd[2]["rf_auc"]


def test_small_classes_are_skipped_with_reasons(results: dict) -> None:
    floor = results["sets"]["real_floor"]["per_seed"][0]
    skipped = floor["block_b"]["skipped"]
    assert "CD34+" in skipped and "< 20" in skipped["CD34+"]
    assert "Dendritic" in floor["block_b"]["per_class"]
    assert set(floor["block_a"]["cfgen"]["skipped"]) == set(skipped)


def test_per_class_summary_has_distances_only_for_evaluated_classes(results: dict) -> None:
    per_class = results["sets"]["poisson_mean"]["summary_per_class"]
    assert {"w2", "mmd2_u", "energy", "cond_accuracy"} <= set(per_class["Dendritic"])
    # CD34+ (4 test cells) is skipped for distances but still scored by the classifier.
    assert "w2" not in per_class["CD34+"] and "cond_accuracy" in per_class["CD34+"]


def test_every_number_carries_n_and_representation(results: dict) -> None:
    for r in results["sets"].values():
        for key, entry in r["summary"].items():
            assert {"n_real", "n_gen", "representation", "estimator", "sem"} <= set(entry), key
    assert results["settings"]["n_hvg"] == 765 and len(results["settings"]["hvg_genes"]) == 765


def test_summarize_is_mean_and_sem_over_seeds() -> None:
    meta = {"n_real": 3, "n_gen": 3, "representation": "r", "estimator": "e"}
    per_seed = {
        s: {"block_b": {"global": {"w2": {**meta, "value": v}}}}
        for s, v in zip((0, 1, 2), (1.0, 2.0, 4.0), strict=True)
    }
    out = summarize(per_seed)["w2"]
    assert out["value"] == pytest.approx(7 / 3)
    assert out["sem"] == pytest.approx(np.std([1, 2, 4], ddof=1) / np.sqrt(3))
    assert out["n_seeds"] == 3 and out["n_real"] == 3
    del per_seed[2]["block_b"]["global"][
        "w2"
    ]  # a key missing at one seed is averaged over the rest
    assert summarize(per_seed)["w2"]["n_seeds"] == 2


def test_align_genes_reports_and_drops_unshared_genes() -> None:
    ref = ad.AnnData(np.ones((2, 4)), var=pd.DataFrame(index=["g0", "g1", "g2", "g3"]))
    gen = ad.AnnData(np.ones((2, 4)), var=pd.DataFrame(index=["g3", "g0", "g1", "x9"]))
    genes, missing = align_genes(ref, {"gen": gen})
    assert genes == ["g0", "g1", "g3"]  # reference order, whatever the other set's order
    assert missing == {"gen": ["g2"], "dropped_extra": ["x9"]}


def test_normalized_input_is_not_renormalized() -> None:
    log = np.log1p(np.array([[10.0, 0.0], [5.0, 5.0]]))
    a = ad.AnnData(log, obs=pd.DataFrame({"cell_type": ["a", "b"]}, index=["0", "1"]))
    as_log = make_set(a, "cell_type", is_normalized=True)
    assert np.array_equal(as_log.log, log) and as_log.libsize is None
    as_counts = make_set(a, "cell_type")
    assert not np.allclose(as_counts.log, log) and as_counts.libsize is not None


@pytest.mark.parametrize("flavor", ["igraph", "leidenalg"])
@pytest.mark.filterwarnings("ignore:In the future, the default backend for leiden:FutureWarning")
def test_leiden_clustering_runs_on_the_bundled_pbmc_data(flavor: str) -> None:
    """scanpy's Leiden works here (igraph and leidenalg are dependencies; users cluster the
    generated cells with it). The evaluation itself does not cluster.

    pbmc68k_reduced ships its neighbour graph and a Louvain clustering of it; Leiden on the same
    graph must find clusters that largely agree with those.
    """
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    adata = sc.datasets.pbmc68k_reduced()
    extra = {"n_iterations": 2, "directed": False} if flavor == "igraph" else {}
    sc.tl.leiden(adata, flavor=flavor, random_state=0, key_added="leiden", **extra)
    clusters = adata.obs["leiden"]
    assert clusters.notna().all() and 4 <= clusters.nunique() <= 30
    assert adjusted_rand_score(clusters, adata.obs["louvain"]) > 0.6

"""Block A: paper-compatible recipes of scDiffusion, CFGen and scLDM (docs/evaluation.md).

These follow the original definitions so numbers can sit next to published tables; they are
not what we use to judge models (see Block B in ``protocol``). Shape legend: M real rows,
N generated rows, G genes, H HVGs.
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

from atlasldm.evaluation.distances import (
    frechet_distance,
    mmd_scdiffusion,
    rbf_mmd2_biased,
    wasserstein,
)
from atlasldm.evaluation.genes import stat_agreement
from atlasldm.evaluation.prdc import prdc
from atlasldm.evaluation.preprocess import Projection, ProjectionMode, fit_projection
from atlasldm.evaluation.twosample import knn_identity_f1, one_nn_accuracy, rf_auc

MODES: tuple[ProjectionMode, ...] = ("centred", "uncentered_published")


def scdiffusion_metrics(
    real_log: np.ndarray, gen_log: np.ndarray, rf_trees: int = 1000, seed: int = 0
) -> dict:
    """Return scDiffusion-style SCC/PCC of gene means, 5-kernel MMD and RF AUC (all genes).

    The MMD uses a joint centred 50-PC PCA of equal-size real and generated sets (the larger
    side is subsampled with ``seed``); the RF AUC uses the authors' forest settings.
    """
    means = stat_agreement(real_log.mean(0), gen_log.mean(0), "mean")
    n = min(len(real_log), len(gen_log))
    rng = np.random.default_rng(seed)
    r = real_log if len(real_log) == n else real_log[np.sort(rng.choice(len(real_log), n, False))]
    g = gen_log if len(gen_log) == n else gen_log[np.sort(rng.choice(len(gen_log), n, False))]
    pooled = np.concatenate([r, g])
    n_comp = min(50, pooled.shape[0] - 1, pooled.shape[1] - 1)
    z = PCA(n_components=n_comp, svd_solver="arpack", random_state=0).fit_transform(pooled)
    return {
        "scc": means["mean_scc"],
        "pcc": means["mean_pcc"],
        "mmd_5kernel": mmd_scdiffusion(z[:n], z[n:]),
        # The forest sees the same joint 50 PCs as the MMD (one PCA instead of two).
        "rf_auc": rf_auc(z[:n], z[n:], n_components=None, n_estimators=rf_trees),
        "n": n,
    }


def _cap(x: np.ndarray, n_max: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n_max else x[np.sort(rng.choice(len(x), n_max, replace=False))]


def _class_metrics(real_c: np.ndarray, gens: dict[str, np.ndarray]) -> dict:
    """Return W1/W2/biased RBF MMD² per projection mode and L1 PRDC (centred) of one class."""
    out = {}
    for mode, gen_c in gens.items():
        out[f"w1_{mode}"] = wasserstein(real_c, gen_c, p=1)["value"]
        out[f"w2_{mode}"] = wasserstein(real_c, gen_c, p=2)["value"]
        out[f"mmd2_biased_{mode}"] = rbf_mmd2_biased(real_c, gen_c)
    out.update({f"{k}_l1k10": v for k, v in prdc(real_c, gens["centred"], 10, "cityblock").items()})
    return out


def cfgen_metrics(
    real_hvg: np.ndarray,
    gen_hvg: np.ndarray,
    real_labels: np.ndarray,
    gen_labels: np.ndarray,
    n_pcs: int = 30,
    min_cells: int = 20,
    max_cells: int = 3000,
    seed: int = 0,
    proj: Projection | None = None,
) -> dict:
    """Return CFGen-style per-class metrics on 30 PCs of a PCA fitted on the real test set.

    Real cells are projected centred; generated cells either centred on the real mean or
    ``uncentered_published`` (loadings applied without mean subtraction, camera-ready CFGen).
    Classes with < ``min_cells`` cells on either side are skipped with the reason; larger
    classes are capped at ``max_cells``. Aggregate = mean over classes ± std/√(classes).
    ``proj`` passes that test-set PCA in when it was already fitted (it is shared by all sets).
    """
    real_labels, gen_labels = (
        np.asarray(real_labels).astype(str),
        np.asarray(gen_labels).astype(str),
    )
    proj = proj or fit_projection(real_hvg, n_pcs, seed)
    real_z = proj.project(real_hvg, "centred")
    gen_z = {m: proj.project(gen_hvg, m) for m in MODES}
    knn = KNeighborsClassifier(n_neighbors=10).fit(real_z, real_labels)
    gen_pred = knn.predict(gen_z["centred"])
    rng = np.random.default_rng(seed)
    per_class: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for c in map(str, np.unique(np.concatenate([real_labels, gen_labels]))):
        nr, ng = int(np.sum(real_labels == c)), int(np.sum(gen_labels == c))
        if min(nr, ng) < min_cells:
            skipped[c] = f"{nr} real / {ng} generated cells < {min_cells}"
            continue
        real_c = _cap(real_z[real_labels == c], max_cells, rng)
        gens = {
            m: _cap(z[gen_labels == c], max_cells, np.random.default_rng(seed))
            for m, z in gen_z.items()
        }
        row = _class_metrics(real_c, gens)
        mask = gen_labels == c
        row["knn_category_f1"] = float(f1_score(gen_labels[mask], gen_pred[mask], average="macro"))
        row.update(n_real=len(real_c), n_gen=len(gens["centred"]))
        per_class[c] = row
    return {
        "per_class": per_class,
        "skipped": skipped,
        "class_mean": _class_aggregate(per_class),
        "global_f1": float(f1_score(gen_labels, gen_pred, average="macro")),
        "knn_identity_f1": knn_identity_f1(real_z, gen_z["centred"]),
        "scldm_inferred": scldm_metrics(real_z, gen_z["centred"], seed),
    }


def _class_aggregate(per_class: dict[str, dict]) -> dict:
    """Return mean over classes and std/√(number of classes) of every numeric class metric."""
    if not per_class:
        return {}
    keys = [k for k in next(iter(per_class.values())) if not k.startswith("n_")]
    out = {}
    for k in keys:
        vals = np.array([row[k] for row in per_class.values()], dtype=float)
        out[k] = {
            "mean": float(np.mean(vals)),
            "se_classes": float(np.std(vals) / np.sqrt(len(vals))),
        }
    return out


def scldm_metrics(real_z: np.ndarray, gen_z: np.ndarray, seed: int = 0) -> dict:
    """Return scLDM-style (inferred) global W2, biased RBF MMD², FD, 1-NN accuracy, P/R.

    Computed with the CFGen pipeline (PCs of a PCA fitted on the real test set, centred).
    """
    pr = prdc(real_z, gen_z, 10, "cityblock")
    return {
        "w2": wasserstein(real_z, gen_z, p=2)["value"],
        "mmd2_biased": rbf_mmd2_biased(real_z, gen_z),
        "fd": frechet_distance(real_z, gen_z),
        "one_nn_accuracy": one_nn_accuracy(real_z, gen_z, seed)["value"],
        "precision": pr["precision"],
        "recall": pr["recall"],
    }

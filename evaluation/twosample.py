"""Classifier two-sample tests: held-out C2ST AUC, scDiffusion RF AUC, 1-NN LOO accuracy.

Shape legend: real (M, D), gen (N, D); label 1 = real, 0 = generated. Pitfalls cited by number
are those of docs/evaluation.md, 'Known pitfalls'.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.spatial.distance import cdist
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def equal_size(real: np.ndarray, gen: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return both sets subsampled without replacement to min(M, N) rows (fixed seed)."""
    n = min(len(real), len(gen))
    rng = np.random.default_rng(seed)
    pick = [
        a if len(a) == n else a[np.sort(rng.choice(len(a), n, replace=False))] for a in (real, gen)
    ]
    return pick[0], pick[1]


def _pooled(real: np.ndarray, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([real, gen])
    y = np.concatenate([np.ones(len(real), int), np.zeros(len(gen), int)])
    return x, y


def c2st_auc(
    real: np.ndarray,
    gen: np.ndarray,
    classifier: Literal["knn", "logreg"] = "knn",
    n_splits: int = 5,
    seed: int = 0,
) -> dict:
    """Return the held-out C2ST ROC AUC averaged over stratified folds as ``{value, n}``.

    The sets are first cut to equal size. kNN uses k = 5; logistic regression the sklearn
    default L2 penalty. 0.5 means the classifier cannot tell the sets apart.
    """
    real, gen = equal_size(real, gen, seed)
    x, y = _pooled(real, gen)
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    aucs = []
    for train, test in folds.split(x, y):
        if classifier == "knn":
            model = KNeighborsClassifier(n_neighbors=5)
        elif classifier == "logreg":
            # Standardising first makes L-BFGS converge in a few iterations.
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        else:
            raise ValueError(f"unknown classifier {classifier!r}")
        model.fit(x[train], y[train])
        aucs.append(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1]))
    return {"value": float(np.mean(aucs)), "n": len(real)}


def rf_auc(
    real: np.ndarray, gen: np.ndarray, n_components: int | None = 50, n_estimators: int = 1000
) -> float:
    """Return scDiffusion's random-forest ROC AUC on a joint PCA of the pooled rows.

    Settings of the authors' notebook: joint centred PCA (arpack, 50 PCs), 75/25 split with
    ``random_state=1``, 1,000 trees of depth ≤ 5, balanced class weights, ``random_state=1``.
    ``n_components=None`` skips the PCA for inputs that already are joint PCs.
    """
    x, y = _pooled(real, gen)
    if n_components is not None:
        n_comp = min(n_components, x.shape[1] - 1, x.shape[0] - 1)
        x = PCA(n_components=n_comp, svd_solver="arpack", random_state=0).fit_transform(x)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=1)
    forest = RandomForestClassifier(
        n_estimators=n_estimators, max_depth=5, class_weight="balanced", random_state=1
    )
    forest.fit(x_tr, y_tr)
    return float(roc_auc_score(y_te, forest.predict_proba(x_te)[:, 1]))


def one_nn_accuracy(real: np.ndarray, gen: np.ndarray, seed: int = 0) -> dict:
    """Return leave-one-out 1-NN two-sample accuracy on equal-size pooled sets (0.5 ideal)."""
    real, gen = equal_size(real, gen, seed)
    x, y = _pooled(real, gen)
    d = cdist(x, x, "sqeuclidean")
    np.fill_diagonal(d, np.inf)  # leave one out: a point may not be its own neighbour
    pred = y[np.argmin(d, axis=1)]
    return {"value": float(np.mean(pred == y)), "n": len(real)}


def knn_identity_f1(real: np.ndarray, gen: np.ndarray, k: int = 10) -> float:
    """Return CFGen's in-sample kNN real-vs-generated macro-F1 (compatibility only, pitfall 4)."""
    x, y = _pooled(real, gen)
    model = KNeighborsClassifier(n_neighbors=k).fit(x, y)
    return float(f1_score(y, model.predict(x), average="macro"))

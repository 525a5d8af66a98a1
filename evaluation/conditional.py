"""Conditional fidelity: does a classifier trained on real cells recover the condition?

Shape legend: N cells, P principal components. Pitfalls cited by number are those of
docs/evaluation.md, 'Known pitfalls'; the protocol is its Block B metric 7.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler


def celltypist_available() -> bool:
    """Return whether CellTypist can be imported (it is optional; not used otherwise)."""
    try:
        import celltypist  # noqa: F401
    except ImportError:
        return False
    return True


def fit_label_classifier(ref_pcs: np.ndarray, ref_labels: np.ndarray) -> Pipeline:
    """Return a standardised logistic regression fitted on (N, P) reference PCs and labels."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0))
    return model.fit(ref_pcs, np.asarray(ref_labels).astype(str))


def label_scores(model: Pipeline, pcs: np.ndarray, labels: np.ndarray) -> dict:
    """Return accuracy and macro-F1 overall and per class of predictions against ``labels``.

    Per-class accuracy is the share of cells of that conditioning label predicted as it
    (CellTypist-style accuracy); per-class F1 is computed over the labels present.
    """
    labels = np.asarray(labels).astype(str)
    pred = model.predict(pcs).astype(str)
    classes = np.unique(labels)
    f1s = f1_score(labels, pred, labels=classes, average=None, zero_division=0)
    per_class = {
        c: {
            "accuracy": float(np.mean(pred[labels == c] == c)),
            "f1": float(f),
            "n": int(np.sum(labels == c)),
        }
        for c, f in zip(classes, f1s, strict=True)
    }
    return {
        "accuracy": float(np.mean(pred == labels)),
        "macro_f1": float(np.mean(f1s)),
        "per_class": per_class,
    }


def conditional_fidelity(
    model: Pipeline,
    gen_pcs: np.ndarray,
    gen_labels: np.ndarray,
    test_pcs: np.ndarray,
    test_labels: np.ndarray,
) -> dict:
    """Return label scores on generated cells next to the same classifier's scores on real test.

    The real-test numbers are the ceiling to read generated accuracy against (pitfall 6:
    prototypical generated cells can beat real data).
    """
    return {
        "generated": label_scores(model, gen_pcs, gen_labels),
        "real_test": label_scores(model, test_pcs, test_labels),
    }

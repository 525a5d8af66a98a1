"""Block B headline metrics of one evaluated set against the real test set (docs/evaluation.md).

Each value is returned as ``{value, n_real, n_gen, representation, estimator}`` so that no
number leaves without its sample sizes and representation. Shape legend: N cells, P PCs.
"""

from __future__ import annotations

import numpy as np

from atlasldm.evaluation.conditional import conditional_fidelity
from atlasldm.evaluation.context import Context, EvalSet
from atlasldm.evaluation.distances import (
    energy_distance,
    frechet_distance,
    mmd2_unbiased,
    wasserstein,
)
from atlasldm.evaluation.genes import gene_fidelity
from atlasldm.evaluation.prdc import prdc
from atlasldm.evaluation.twosample import c2st_auc, equal_size

PC_REP = "{p} PCs of {h} HVGs, reference PCA, centred"
GENE_REP = "log1p-CP10k, all genes and HVGs"


def _m(value: float, n_real: int, n_gen: int, rep: str, estimator: str, **extra) -> dict:
    meta = {"n_real": int(n_real), "n_gen": int(n_gen), "representation": rep}
    return {"value": float(value), **meta, "estimator": estimator, **extra}


def subsample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Return n rows of x chosen without replacement by ``seed`` (x itself when n = len(x)).

    The indices depend only on (len(x), n, seed), so every method gets the same real rows.
    """
    if len(x) == n:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))]


def distribution_metrics(
    real: np.ndarray, gen: np.ndarray, h: float, n_max: int, seed: int, rep: str
) -> dict:
    """Return W2 (all cells), unbiased MMD² and energy distance (fixed n) of two PC sets."""
    w2 = wasserstein(real, gen, p=2)
    n = min(n_max, len(real), len(gen))
    r, g = subsample(real, n, seed), subsample(gen, n, seed)
    return {
        "w2": _m(w2["value"], len(real), len(gen), rep, w2["method"], epsilon=w2["epsilon"]),
        "mmd2_u": _m(
            mmd2_unbiased(r, g, h), n, n, rep, f"unbiased MMD², multi-scale RBF, h={h:.3g}"
        ),
        "energy": _m(energy_distance(r, g), n, n, rep, "U-statistic"),
    }


def global_metrics(ctx: Context, gen_pcs: np.ndarray, gen: EvalSet) -> dict:
    """Return the global Block B metrics 1-6 and 9 (labels ignored)."""
    cfg, real = ctx.config, ctx.test_pcs
    rep = PC_REP.format(p=real.shape[1], h=len(ctx.rep.hvg_idx))
    out = distribution_metrics(real, gen_pcs, ctx.bandwidth, cfg.mmd_n_global, cfg.seed, rep)
    for clf in ("knn", "logreg"):
        c2 = c2st_auc(real, gen_pcs, clf, seed=cfg.seed)
        out[f"c2st_{clf}_auc"] = _m(c2["value"], c2["n"], c2["n"], rep, f"held-out 5-fold {clf}")
    r, g = equal_size(real, gen_pcs, cfg.seed)
    for k, v in prdc(r, g, 5, "euclidean").items():
        out[k] = _m(v, len(r), len(g), rep, "PRDC Euclidean k=5")
    out["fd"] = _m(frechet_distance(real, gen_pcs), len(real), len(gen_pcs), rep, "Fréchet")
    genes = gene_fidelity(ctx.test.log, gen.log, ctx.rep.hvg_idx, ctx.test.libsize, gen.libsize)
    for k, v in genes.items():
        out[f"genes/{k}"] = _m(v, len(real), len(gen_pcs), GENE_REP, "per-gene statistics")
    return out


def class_metrics(ctx: Context, gen_pcs: np.ndarray, gen: EvalSet) -> tuple[dict, dict]:
    """Return per-class W2 / MMD² / energy and the skipped classes with their reasons."""
    cfg = ctx.config
    rep = PC_REP.format(p=ctx.test_pcs.shape[1], h=len(ctx.rep.hvg_idx))
    per_class, skipped = {}, {}
    for c in np.unique(np.concatenate([ctx.test.labels, gen.labels])):
        real_c, gen_c = ctx.test_pcs[ctx.test.labels == c], gen_pcs[gen.labels == c]
        if min(len(real_c), len(gen_c)) < cfg.min_class_cells:
            skipped[str(c)] = (
                f"{len(real_c)} real / {len(gen_c)} evaluated cells < {cfg.min_class_cells}"
            )
            continue
        per_class[str(c)] = distribution_metrics(
            real_c, gen_c, ctx.bandwidth, cfg.mmd_n_class, cfg.seed, rep
        )
    return per_class, skipped


def block_b(ctx: Context, gen: EvalSet) -> dict:
    """Return ``{global, per_class, skipped, conditional}`` Block B results of one set."""
    gen_pcs = ctx.rep.pcs(gen.log)
    out = global_metrics(ctx, gen_pcs, gen)
    per_class, skipped = class_metrics(ctx, gen_pcs, gen)
    for key in ("w2", "mmd2_u", "energy"):
        vals = [row[key]["value"] for row in per_class.values()]
        if vals:
            first = next(iter(per_class.values()))[key]
            out[f"{key}_class_mean"] = {
                **first,
                "value": float(np.mean(vals)),
                "n_real": "per class",
                "n_gen": "per class",
                "n_classes": len(vals),
            }
    cond = conditional_fidelity(ctx.classifier, gen_pcs, gen.labels, ctx.test_pcs, ctx.test.labels)
    crep = "logistic regression on reference PCs"
    for k in ("accuracy", "macro_f1"):
        out[f"cond_{k}"] = _m(
            cond["generated"][k], len(ctx.test_pcs), len(gen_pcs), crep, "classifier"
        )
        out[f"cond_{k}_real_test"] = _m(
            cond["real_test"][k], len(ctx.test_pcs), len(ctx.test_pcs), crep, "classifier"
        )
    return {"global": out, "per_class": per_class, "skipped": skipped, "conditional": cond}

"""Gene-level fidelity on log1p-CP10k (docs/evaluation.md, Block B metric 6).

Shape legend: real (M, G), gen (N, G) log1p-CP10k rows; H HVG indices, most variable first.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr, wasserstein_distance


def r2_score_real_target(real: np.ndarray, gen: np.ndarray) -> float:
    """Return 1 − Σ(gen − real)² / Σ(real − mean(real))², real being the target."""
    denom = np.sum((real - real.mean()) ** 2)
    return float(1.0 - np.sum((gen - real) ** 2) / denom) if denom > 0 else float("nan")


def _corr(a: np.ndarray, b: np.ndarray, kind: str) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")  # correlation undefined for a constant vector
    return float(pearsonr(a, b)[0] if kind == "pcc" else spearmanr(a, b)[0])


def stat_agreement(real_stat: np.ndarray, gen_stat: np.ndarray, prefix: str) -> dict:
    """Return ``{prefix_scc, prefix_pcc, prefix_r2}`` comparing two per-gene statistics."""
    return {
        f"{prefix}_scc": _corr(real_stat, gen_stat, "scc"),
        f"{prefix}_pcc": _corr(real_stat, gen_stat, "pcc"),
        f"{prefix}_r2": r2_score_real_target(real_stat, gen_stat),
    }


def gene_correlation_agreement(real: np.ndarray, gen: np.ndarray) -> dict:
    """Return Frobenius distance and Pearson r between gene-gene correlation matrices.

    Genes constant in one set get zero correlations instead of NaN. The Pearson r uses the
    strict upper triangle, since the unit diagonal would inflate it.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        c_real = np.nan_to_num(np.corrcoef(real, rowvar=False))
        c_gen = np.nan_to_num(np.corrcoef(gen, rowvar=False))
    iu = np.triu_indices(real.shape[1], k=1)
    return {
        "genecorr_frobenius": float(np.linalg.norm(c_real - c_gen)),
        "genecorr_pcc": _corr(c_real[iu], c_gen[iu], "pcc"),
    }


def library_size_w1(real_libsize: np.ndarray, gen_libsize: np.ndarray) -> float:
    """Return W1 between log10 library-size distributions (cells with 0 counts dropped)."""
    a, b = real_libsize[real_libsize > 0], gen_libsize[gen_libsize > 0]
    return float(wasserstein_distance(np.log10(a), np.log10(b)))


def gene_fidelity(
    real: np.ndarray,
    gen: np.ndarray,
    hvg_idx: np.ndarray,
    real_libsize: np.ndarray | None = None,
    gen_libsize: np.ndarray | None = None,
    n_corr_genes: int = 200,
) -> dict:
    """Return gene-level fidelity metrics for all genes (``all/``) and HVGs (``hvg/``).

    Per-gene mean and variance: SCC, PCC and R² (real is the target); Pearson r of per-gene
    zero fractions; W1 of log10 library sizes when both raw library sizes are given (NaN
    otherwise, e.g. for normalised generated input); gene-gene correlation agreement on the
    first ``n_corr_genes`` HVGs.
    """
    out: dict[str, float] = {}
    for name, cols in (("all", slice(None)), ("hvg", hvg_idx)):
        r, g = real[:, cols], gen[:, cols]
        for stat, fn in (("mean", np.mean), ("var", np.var)):
            part = stat_agreement(fn(r, axis=0), fn(g, axis=0), stat)
            out.update({f"{name}/{k}": v for k, v in part.items()})
        out[f"{name}/zero_frac_pcc"] = _corr((r == 0).mean(0), (g == 0).mean(0), "pcc")
    top = hvg_idx[:n_corr_genes]
    out.update(gene_correlation_agreement(real[:, top], gen[:, top]))
    if real_libsize is not None and gen_libsize is not None:
        out["libsize_log10_w1"] = library_size_w1(real_libsize, gen_libsize)
    else:
        out["libsize_log10_w1"] = float("nan")
    return out

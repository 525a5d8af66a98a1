"""Distribution distances between two point clouds (docs/evaluation.md, Blocks A and B).

Shape legend: x (M, D) real rows, y (N, D) generated rows, D features (usually 30 PCs).
"""

from __future__ import annotations

import numpy as np
import ot
from scipy.linalg import sqrtm
from scipy.spatial.distance import cdist, pdist

CFGEN_SIGMAS = (0.01, 0.1, 1.0, 10.0, 100.0)  # CFGen's multi-σ RBF kernel
BLOCK_B_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # multiples of the median-heuristic bandwidth
EXACT_OT_MAX = 10_000  # cells per side up to which W1/W2 use exact EMD
SINKHORN_REL_EPS = 0.01  # Sinkhorn ε as a share of the mean cost above EXACT_OT_MAX


def wasserstein(x: np.ndarray, y: np.ndarray, p: int = 2, exact_max: int = EXACT_OT_MAX) -> dict:
    """Return W1 (p=1) or W2 (p=2) with uniform weights as ``{value, method, epsilon}``.

    Exact EMD (POT ``emd2``, up to 1e7 iterations) when both sides have at most ``exact_max``
    rows; otherwise entropic Sinkhorn (log domain) with ε reported beside the value. W2 is
    the square root of the optimal squared-Euclidean cost; W1 uses the Euclidean cost.
    """
    if p not in (1, 2):
        raise ValueError("p must be 1 or 2")
    cost = cdist(x, y, "sqeuclidean" if p == 2 else "euclidean")
    a = np.full(len(x), 1.0 / len(x))
    b = np.full(len(y), 1.0 / len(y))
    if max(len(x), len(y)) <= exact_max:
        total = float(ot.emd2(a, b, cost, numItermax=int(1e7)))
        method, eps = "exact_emd", None
    else:
        eps = float(SINKHORN_REL_EPS * cost.mean())
        total = float(ot.sinkhorn2(a, b, cost, eps, method="sinkhorn_log", numItermax=2000))
        method = "sinkhorn"
    value = float(np.sqrt(max(total, 0.0))) if p == 2 else total
    return {"value": value, "method": method, "epsilon": eps}


def rbf_mmd2_biased(x: np.ndarray, y: np.ndarray, sigmas=CFGEN_SIGMAS) -> float:
    """Return CFGen's biased MMD² with k = Σ_σ exp(-‖x-y‖²/2σ²), diagonals included.

    Both sets are cut to their first min(M, N) rows, as in CFGen's code.
    """
    n = min(len(x), len(y))
    x, y = x[:n], y[:n]
    kxx, kyy, kxy = (
        _multi_rbf(cdist(a, b, "sqeuclidean"), sigmas) for a, b in ((x, x), (y, y), (x, y))
    )
    return float(kxx.mean() + kyy.mean() - 2 * kxy.mean())


def _multi_rbf(sq: np.ndarray, sigmas, average: bool = False) -> np.ndarray:
    k = sum(np.exp(-sq / (2.0 * s**2)) for s in sigmas)
    return k / len(sigmas) if average else k


def median_bandwidth(ref: np.ndarray, max_n: int = 2000, seed: int = 0) -> float:
    """Return the median pairwise Euclidean distance among (up to ``max_n``) reference rows."""
    rng = np.random.default_rng(seed)
    if len(ref) > max_n:
        ref = ref[rng.choice(len(ref), max_n, replace=False)]
    return float(np.median(pdist(ref)))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, h: float, scales=BLOCK_B_SCALES) -> float:
    """Return the unbiased MMD² U-statistic with k = mean_s exp(-‖x-y‖² / 2(s·h)²).

    Diagonal terms of K_XX and K_YY are excluded; the value can be slightly negative.
    """
    sig = [s * h for s in scales]
    m, n = len(x), len(y)
    kxx = _multi_rbf(cdist(x, x, "sqeuclidean"), sig, average=True)
    kyy = _multi_rbf(cdist(y, y, "sqeuclidean"), sig, average=True)
    kxy = _multi_rbf(cdist(x, y, "sqeuclidean"), sig, average=True)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def mmd_scdiffusion(x: np.ndarray, y: np.ndarray) -> float:
    """Return scDiffusion's 5-kernel MMD (summed kernels, biased, diagonals included).

    D are the pairwise squared distances of the 2n pooled rows (n = min(M, N), first rows);
    base = mean off-diagonal D; bandwidths = base/4 · {1, 2, 4, 8, 16}.
    """
    n = min(len(x), len(y))
    pooled = np.concatenate([x[:n], y[:n]])
    d = cdist(pooled, pooled, "sqeuclidean")
    base = d.sum() / (4 * n * n - 2 * n)
    k = sum(np.exp(-d / (base / 4.0 * 2.0**i)) for i in range(5))
    return float(np.mean(k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n]))


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Return 2·E‖X−Y‖ − E‖X−X′‖ − E‖Y−Y′‖ with within-set terms as U-statistics (i ≠ j)."""
    m, n = len(x), len(y)
    dxy = cdist(x, y).mean()
    dxx = pdist(x).sum() * 2.0 / (m * (m - 1))
    dyy = pdist(y).sum() * 2.0 / (n * (n - 1))
    return float(2.0 * dxy - dxx - dyy)


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Return ‖μx − μy‖² + Tr(Σx + Σy − 2(Σx Σy)^{1/2}) of Gaussians fitted to x and y."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x = np.atleast_2d(np.cov(x, rowvar=False))
    cov_y = np.atleast_2d(np.cov(y, rowvar=False))
    root = sqrtm(cov_x @ cov_y)
    # sqrtm of a product of PSD matrices is real up to round-off; drop the imaginary dust.
    root = np.real(root)
    value = np.sum((mu_x - mu_y) ** 2) + np.trace(cov_x + cov_y - 2.0 * root)
    return float(value)

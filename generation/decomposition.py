"""Sets that split the gap between generated and real cells into stages (docs/fidelity.md).

A generated cell passes through three stages before it is scored: the NB noise model (counts drawn
around a mean), the VAE (a latent decoded into that mean), and the latent generator (the DiT
drawing the latent). Scoring each of the sets below against the same held-out cells as the
generated ones says how much of the gap each stage adds:

- `nb_resample`: the real cells' own smoothed expression, NB-sampled with the VAE's dispersions
  and the cells' library sizes. Only the noise model stands between these and real cells.
- `vae_means`: the VAE's decoded means of the real cells (encode to the posterior mean, decode
  μ), without sampling, as log1p-CP10k (what the VAE keeps of each cell).
- `vae_recon`: the same means NB-sampled with the real library sizes: the VAE plus the noise
  model, with a perfect latent generator.

Every set has one row per real cell per seed, with the cells' obs and a `seed` column, so it is
scored exactly like a generate run that matched those cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from atlasldm.generation.api import CellGenerator, generator_of
from atlasldm.generation.encode import ENCODE_BATCH, encode_cells, row_blocks, vocabulary_tokens
from atlasldm.generation.sampling import decode
from atlasldm.models.likelihoods import sample_nb

CP10K = 1e4
SMOOTH_NEIGHBOURS = 10  # cells averaged into each smoothed profile, the cell itself included
SMOOTH_PCS = 30  # PCA dimensions in which the neighbours are found


def _dense_counts(cells: ad.AnnData) -> np.ndarray:
    """X of `cells` as a dense float64 array (the sets are test-sized: hundreds to thousands)."""
    X = cells.X
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


def _stack(cells: ad.AnnData, parts: list[np.ndarray], seeds: Sequence[int], var) -> ad.AnnData:
    """One AnnData of `parts` (one (N, G) block per seed) with the cells' obs and a seed column."""
    obs = pd.concat([cells.obs.assign(seed=s) for s in seeds])
    obs.index = pd.Index([f"{i}-s{s}" for s in seeds for i in cells.obs_names], name="obs_id")
    X = sp.csr_matrix(np.concatenate(parts).astype(np.float32))
    return ad.AnnData(X=X, obs=obs, var=var)


def smoothed_profiles(counts: np.ndarray, k: int = SMOOTH_NEIGHBOURS, seed: int = 0) -> np.ndarray:
    """Return each cell's expression profile (N, G), rows summing to 1, averaged over its k nearest
    cells (itself included) in the PCA of log1p-CP10k.

    One cell's counts are a single noisy draw around its mean; averaging k similar cells removes
    most of that draw while keeping what sets the cell's neighbourhood apart.
    """
    lib = counts.sum(1, keepdims=True)
    if np.any(lib <= 0):
        raise ValueError("every cell needs a positive library size to be smoothed")
    profiles = counts / lib
    log = np.log1p(profiles * CP10K)
    n_pcs = max(1, min(SMOOTH_PCS, log.shape[0] - 1, log.shape[1]))
    pcs = PCA(n_pcs, random_state=seed).fit_transform(log - log.mean(0))
    k = min(k, len(counts))
    _, idx = NearestNeighbors(n_neighbors=k).fit(pcs).kneighbors(pcs)
    return profiles[idx].mean(axis=1)


def nb_resample(
    gen: CellGenerator, cells: ad.AnnData, seeds: Sequence[int], k: int = SMOOTH_NEIGHBOURS
) -> ad.AnnData:
    """Return `nb_resample`: NB(μ = smoothed profile × library size, θ of the VAE) per seed."""
    ex = gen.exports
    if ex.vae.decoder_head.theta is None:
        raise ValueError("nb_resample needs an NB-likelihood VAE (this one is Gaussian)")
    counts = _dense_counts(cells)
    tokens = torch.from_numpy(vocabulary_tokens(cells.var_names, ex.genes))
    with torch.no_grad():
        log_theta = ex.vae.decoder_head.log_theta(tokens.to(gen.device)).cpu()
    mu = smoothed_profiles(counts, k) * counts.sum(1, keepdims=True)
    log_mu = torch.from_numpy(np.log(np.maximum(mu, 1e-30))).float()
    parts = [sample_nb(log_mu, log_theta, generator_of((s, 0))).numpy() for s in seeds]
    return _stack(cells, parts, seeds, cells.var)


def reconstructions(
    gen: CellGenerator, cells: ad.AnnData, seeds: Sequence[int], batch_size: int = ENCODE_BATCH
) -> tuple[ad.AnnData, ad.AnnData]:
    """Return (`vae_recon` counts, `vae_means` log1p-CP10k) of the real `cells`, per seed.

    Library sizes are the cells' own row sums; each seed draws its own NB noise (the means do not
    depend on the seed, so `vae_means` repeats them once per seed to be scored alike).
    """
    ex = gen.exports
    if ex.vae.decoder_head.theta is None:
        raise ValueError("vae_recon needs an NB-likelihood VAE (this one is Gaussian)")
    z = encode_cells(ex.vae, cells, ex.genes, gen.device, batch_size)
    lib = np.asarray(cells.X.sum(axis=1), dtype=np.float64).ravel()
    # Decoded values come in vocabulary order (token t in column t - 1); keep the cells' order.
    columns = vocabulary_tokens(cells.var_names, ex.genes) - 1
    counts, means = [], []
    for s in seeds:
        drawn, mu = [], []
        for i, (lo, hi) in enumerate(row_blocks(cells.n_obs, batch_size)):
            c, m = decode(ex, z[lo:hi], lib[lo:hi], generator_of((s, i)), means=True)
            drawn.append(c.toarray()[:, columns])
            mu.append(m[:, columns])
        counts.append(np.concatenate(drawn))
        mu_all = np.concatenate(mu)
        means.append(np.log1p(mu_all / mu_all.sum(1, keepdims=True) * CP10K))
    recon = _stack(cells, counts, seeds, cells.var)
    log_means = _stack(cells, means, seeds, cells.var)
    log_means.uns["generated_is_normalized"] = True
    return recon, log_means


def decomposition_sets(
    gen: CellGenerator, cells: ad.AnnData, seeds: Sequence[int]
) -> dict[str, ad.AnnData]:
    """Return {nb_resample, vae_means, vae_recon} for the real `cells` at `seeds`."""
    recon, means = reconstructions(gen, cells, seeds)
    return {"nb_resample": nb_resample(gen, cells, seeds), "vae_means": means, "vae_recon": recon}

"""Gene-sampled training decode: each cell's expressed genes plus k genes drawn per micro-batch.

Shape legend:
    B   cells            S   longest expressed-gene list in the batch (padded)
    k   sampled genes    G   vocabulary size (genes 1..G)     c   genes in one decode chunk

The NLL over all G genes splits into the expressed genes of a cell, decoded exactly, and its
unexpressed genes U_b, estimated from a uniform sample R of k genes shared by the micro-batch:
each gene of U_b lands in R with probability k/G, so weighting the sampled terms by G/k (and by 0
where the sampled gene is expressed in that cell, which the exact part already counts) is an
unbiased (Horvitz-Thompson) estimate of the sum over U_b. The library-size normaliser LSE_b =
log sum_g exp(logit_bg) couples every gene; two treatments (docs/sampled_decode.md):

``estimated``  LSE from the same rows and weights. Exact at k = G; otherwise log of an unbiased
               sum, so biased by about -Var/2 (Jensen), with the bias shrinking as k grows.
``exact``      LSE from a no-grad forward over all G genes; its gradient from the sampled rows,
               scaled by the exactly computed dNLL/dLSE. Value exact, gradient unbiased, at the
               cost of one forward (no backward, no kept activations) over all genes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from atlasldm.models.batch import CellBatch


def sample_genes(num_genes: int, k: int, generator: torch.Generator | None) -> Tensor:
    """k distinct genes of 1..G, uniform without replacement, on the generator's device (k,)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(num_genes, generator=generator, device=device)[:k] + 1


def row_weights(batch: CellBatch, sampled: Tensor, num_genes: int) -> tuple[Tensor, Tensor]:
    """Expressed rows and the sampled genes' weights.

    Returns:
        ids (B, S) expressed tokens (PAD 0 replaced by gene 1), and a weight (B, S + k): 1 for
        real expressed rows, 0 for padding, G/k for a sampled gene the cell does not express, 0
        for one it does (already counted among its expressed rows).
    """
    padded = batch.padded()
    mask = padded.mask  # (B, S) True = real token
    ids = torch.where(mask, padded.gene_ids, torch.ones_like(padded.gene_ids))  # (B, S)
    expressed = batch.membership(sampled)  # (B, k) bool
    scale = num_genes / sampled.shape[0]
    weight = torch.cat([mask.float(), (~expressed).float() * scale], dim=1)  # (B, S + k)
    return ids, weight


def _decode(vae, kv: tuple[Tensor, Tensor], ids: Tensor, checkpointed: bool) -> Tensor:
    """Logits (B, c_total) fp32 of ids (c,) shared or (B, c) per cell, chunk by chunk."""
    k, v = kv
    parts = []
    for s in range(0, ids.shape[-1], vae.config.decode_chunk):
        chunk = ids[..., s : s + vae.config.decode_chunk]
        if checkpointed:
            parts.append(checkpoint(vae._chunk_logits, k, v, chunk, use_reentrant=False))
        else:
            parts.append(vae._chunk_logits(k, v, chunk))
    return torch.cat(parts, dim=-1)


def _weighted_lse(logits: Tensor, weight: Tensor) -> Tensor:
    """log sum_j w_j exp(l_j) per row: (B, c), (B, c) -> (B,); zero weights drop out."""
    log_w = torch.where(weight > 0, weight.clamp_min(1e-30).log(), float("-inf"))
    return torch.logsumexp(logits + log_w, dim=-1)


def _weighted_nll(vae, rows: tuple[Tensor, Tensor, Tensor], lse: Tensor, batch) -> Tensor:
    """-sum_j w_j log p(x_j) per cell (B,) over rows (ids (B, c), counts, logits)."""
    ids, logits, weight = rows
    x = batch.dense_target_rows(ids)  # (B, c)
    lp = vae.decoder_head.log_prob(x, logits, lse, batch.library_size, ids)  # (B, c)
    return -torch.where(weight > 0, lp * weight, torch.zeros_like(lp)).sum(dim=-1)


def _exact_lse_and_slope(vae, kv, batch) -> tuple[Tensor, Tensor, Tensor]:
    """No-grad full decode: exact LSE (B,), the exact NLL (B,) and dNLL/dLSE (B,)."""
    k, v = (t.detach() for t in kv)
    all_ids = torch.arange(1, vae.config.num_genes + 1, device=k.device)
    step = vae.config.decode_chunk
    with torch.no_grad():
        starts = range(0, all_ids.shape[0], step)
        chunks = [(s, vae._chunk_logits(k, v, all_ids[s : s + step])) for s in starts]
        lse = torch.logsumexp(torch.cat([lg for _, lg in chunks], dim=-1), dim=-1)  # (B,)
    lse_var = lse.clone().requires_grad_(True)
    nll = torch.zeros_like(lse)
    slope = torch.zeros_like(lse)
    for s, lg in chunks:
        ids = all_ids[s : s + lg.shape[-1]]
        with torch.enable_grad():
            x = batch.dense_target_chunk(s + 1, s + 1 + lg.shape[-1])
            part = -vae.decoder_head.log_prob(x, lg, lse_var, batch.library_size, ids).sum(-1)
            (grad,) = torch.autograd.grad(part.sum(), lse_var)
        nll, slope = nll + part.detach(), slope + grad
    return lse, nll, slope


def sampled_nll(vae, z: Tensor, batch: CellBatch, generator: torch.Generator | None) -> Tensor:
    """Per-cell NLL (B,) over all G genes from the expressed and k sampled genes (see module)."""
    cfg = vae.config
    G = cfg.num_genes
    sampled = sample_genes(G, min(cfg.sampled_zeros, G), generator).to(z.device)  # (k,)
    ids_e, weight = row_weights(batch, sampled, G)
    kv = vae.decoder.context(z)  # 2 x (B, M, H, Dh)
    rows = z.shape[0] * (ids_e.shape[1] + sampled.shape[0])
    ckpt = vae.checkpoints_decode(rows, z.device)
    logits = torch.cat([_decode(vae, kv, ids_e, ckpt), _decode(vae, kv, sampled, ckpt)], dim=-1)
    ids = torch.cat([ids_e, sampled.expand(ids_e.shape[0], -1)], dim=1)  # (B, S + k)
    if vae.decoder_head.theta is None:  # gaussian: no normaliser
        return _weighted_nll(vae, (ids, logits, weight), None, batch)
    if cfg.sampled_normaliser == "estimated":
        return _weighted_nll(vae, (ids, logits, weight), _weighted_lse(logits, weight), batch)
    lse, exact_nll, slope = _exact_lse_and_slope(vae, kv, batch)
    estimate = _weighted_nll(vae, (ids, logits, weight), lse, batch)
    ratio = torch.exp(_weighted_lse(logits, weight) - lse)  # S_hat / S, value near 1
    surrogate = estimate + slope * (ratio - ratio.detach())  # d/dLSE term, unbiased gradient
    return surrogate + (exact_nll - surrogate).detach()  # report the exact NLL as the value

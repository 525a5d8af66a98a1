"""Gene-sampled training decode: each cell's expressed genes plus k of its unexpressed genes.

Shape legend:
    B   cells            S   longest expressed-gene list in the batch (padded)
    k   drawn genes      G   vocabulary size (genes 1..G)

The NLL over all G genes splits into the expressed genes of a cell, decoded exactly, and its
unexpressed genes U_b, estimated from k of them drawn uniformly without replacement for that
cell: each lands in the draw with probability k/|U_b|, so weighting the drawn terms by |U_b|/k is
an unbiased (Horvitz-Thompson) estimate of the sum over U_b. Draws are per cell, so every gene is
drawn by some cell of the micro-batch in most steps: its parameters get a gradient nearly every
step, as under the full decode, instead of rare, large ones that Adam would damp
(docs/sampled_decode.md). The library-size normaliser LSE_b = log sum_g exp(logit_bg) couples
every gene; two treatments:

``estimated``  LSE from the same rows and weights. Exact when k covers U_b; otherwise the log of
               an unbiased sum, so biased by about -Var/2 (Jensen), shrinking as k grows.
``exact``      LSE from a no-grad forward over all G genes; its gradient from the drawn rows,
               scaled by the exactly computed dNLL/dLSE. Value exact, gradient unbiased, at the
               cost of one forward (no backward, no kept activations) over all genes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from atlasldm.models.batch import CellBatch


def sample_unexpressed(
    batch: CellBatch, num_genes: int, k: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Per cell, k genes drawn uniformly without replacement from those it does not express.

    Random keys on the generator's device, expressed genes (and PAD 0) keyed -1, top-k per row.

    Returns:
        ids (B, k') with k' = min(k, G), and their weights (B, k'): |U_b| / min(k, |U_b|) for a
        drawn gene, 0 for a filler slot of a cell with fewer than k unexpressed genes.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    keys = torch.rand(batch.num_cells, num_genes + 1, generator=generator, device=device)
    listed = batch.membership(torch.arange(num_genes + 1, device=batch.device))  # (B, G+1)
    listed[:, 0] = True  # PAD is never drawn
    keys = keys.to(batch.device).masked_fill(listed, -1.0)
    values, ids = keys.topk(min(k, num_genes), dim=1)  # (B, k')
    unexpressed = (num_genes + 1 - listed.sum(dim=1)).float()  # (B,) |U_b|
    per_draw = unexpressed / unexpressed.clamp(max=ids.shape[1]).clamp_min(1)  # (B,)
    return ids, torch.where(values >= 0, per_draw[:, None], torch.zeros_like(values))


def row_weights(
    batch: CellBatch, num_genes: int, k: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Every decoded row of the micro-batch: expressed genes, then k drawn unexpressed ones.

    Returns:
        ids (B, S + k') of gene tokens (PAD replaced by gene 1, with weight 0), and weights
        (B, S + k'): 1 for an expressed gene, |U_b| / k for a drawn one, 0 for padding.
    """
    padded = batch.padded()
    mask = padded.mask  # (B, S) True = real token
    expressed = torch.where(mask, padded.gene_ids, torch.ones_like(padded.gene_ids))  # (B, S)
    drawn, drawn_weight = sample_unexpressed(batch, num_genes, k, generator)
    drawn = torch.where(drawn_weight > 0, drawn, torch.ones_like(drawn))  # fillers: gene 1
    ids = torch.cat([expressed, drawn], dim=1)
    return ids, torch.cat([mask.float(), drawn_weight], dim=1)


def _decode(vae, kv: tuple[Tensor, Tensor], ids: Tensor, checkpointed: bool) -> Tensor:
    """Logits (B, c_total) fp32 of ids (c,) shared or (B, c) per cell, chunk by chunk."""
    k, v = kv
    parts = []
    for s in range(0, ids.shape[-1], vae.config.decode_chunk):
        chunk = ids[..., s : s + vae.config.decode_chunk]
        if checkpointed:
            parts.append(checkpoint(vae.gene_logits, k, v, chunk, use_reentrant=False))
        else:
            parts.append(vae.gene_logits(k, v, chunk))
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
        chunks = [(s, vae.gene_logits(k, v, all_ids[s : s + step])) for s in starts]
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
    ids, weight = row_weights(batch, cfg.num_genes, cfg.sampled_zeros, generator)  # (B, S + k)
    kv = vae.decoder.context(z)  # 2 x (B, M, H, Dh)
    logits = _decode(vae, kv, ids, vae.checkpoints_decode(ids.numel(), z.device))
    if vae.decoder_head.theta is None:  # gaussian: no normaliser
        return _weighted_nll(vae, (ids, logits, weight), None, batch)
    if cfg.sampled_normaliser == "estimated":
        return _weighted_nll(vae, (ids, logits, weight), _weighted_lse(logits, weight), batch)
    lse, exact_nll, slope = _exact_lse_and_slope(vae, kv, batch)
    estimate = _weighted_nll(vae, (ids, logits, weight), lse, batch)
    ratio = torch.exp(_weighted_lse(logits, weight) - lse)  # S_hat / S, value near 1
    surrogate = estimate + slope * (ratio - ratio.detach())  # d/dLSE term, unbiased gradient
    return surrogate + (exact_nll - surrogate).detach()  # report the exact NLL as the value

"""Stage 1: set-transformer VAE with a gene-query decoder and an NB likelihood.

Shape legend:
    B   cells                  T   packed tokens (expressed genes)     S   padded length
    M   latent tokens          D   latent width per token              E   transformer width
    G   decoded genes          c   genes in one decode chunk           H   heads, Dh = E / H
    V   vocabulary size (tokens 1..V, 0 = PAD)

Module and parameter names mirror the scLDM reference (``input_layer``, ``encoder.ca_layer``,
``encoder.encoder_layers``, ``decoder.decoder_cross_attention``, ``decoder_head``) so its
checkpoints map key for key; the default configuration has exactly its parameter count,
33 (V + 1) + 230,305. REF below is that reference implementation (docs/model.md, 'Tags').
Spec: docs/model.md, 'VAE'.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from atlasldm.models.attention import BACKENDS, Backend
from atlasldm.models.batch import CellBatch
from atlasldm.models.decode_cost import (
    Normaliser,
    decode_activation_bytes,
    normalise_switch,
    should_checkpoint,
)
from atlasldm.models.embeddings_count import COUNT_EMBEDDINGS, CountEmbedding, InputLayer
from atlasldm.models.export_format import Pretrained
from atlasldm.models.layers import Block, CrossAttentionBlock, sincos_embedding_1d
from atlasldm.models.likelihoods import (
    LIKELIHOODS,
    Likelihood,
    LikelihoodHead,
    StreamingLogSumExp,
    fp32_island,
    log1p_cp10k,
)
from atlasldm.models.sampled_decode import sampled_nll

Posterior = Literal["deterministic", "gaussian"]
CHECKPOINT_DECODE = {"auto": "auto", "true": "true", "false": "false"}  # also True/False


@dataclass
class VAEConfig:
    """VAE hyperparameters (defaults = the scLDM reference recipe)."""

    num_genes: int  # V, vocabulary size; tokens 1..V, 0 = PAD
    embed_dim: int = 32  # E, transformer width
    num_layers: int = 8  # self-attention blocks in the encoder, and again in the decoder
    num_heads: int = 8  # heads of the self-attention blocks (head dim E / heads)
    num_cross_heads: int = 4  # heads of the MCAB and gene-query cross-attention
    num_latent_tokens: int = 16  # M, latent tokens per cell (the encoder's inducing points)
    latent_dim: int = 16  # D, latent width per token
    count_embedding: CountEmbedding = "log1p_mul"  # f(E[g], c): docs/model.md, 'Count embeddings'
    posterior: Posterior = "deterministic"  # deterministic (REF autoencoder) or gaussian
    beta: float = 0.0  # weight of KL(q(z|x) || N(0, I)); only used with a gaussian posterior
    logvar_min: float = -10.0  # clamp of the predicted log σ² (gaussian posterior)
    logvar_max: float = 5.0  # clamp of the predicted log σ² (gaussian posterior)
    likelihood: Likelihood = "nb_shared_theta"  # NB with per-gene θ, or gaussian on log1p CP10k
    shared_embedding: bool = True  # decoder queries reuse the encoder's gene table
    latent_positions: bool = True  # add a fixed sin-cos embedding over the M tokens (REF slot)
    decode_chunk: int = 4096  # genes per decoder chunk (bounds activation memory)
    # Recompute each decode chunk in backward instead of keeping its activations: "true",
    # "false", or "auto" = only when a micro-batch's decode would keep more than
    # decode_memory_mb of activations (docs/model.md, 'Decode cost').
    checkpoint_decode: str = "auto"
    decode_memory_mb: float = 2048.0  # activation budget of one micro-batch's decode ("auto")
    # k > 0: train on each cell's expressed genes plus k genes drawn per micro-batch, reweighted
    # so the NLL over all genes is estimated without bias (docs/sampled_decode.md); 0 = all genes.
    sampled_zeros: int = 0
    sampled_normaliser: Normaliser = "estimated"  # library-size normaliser under sampled_zeros
    dropout: float = 0.0  # residual dropout in attention blocks
    bias: bool = False  # bias on attention projections and the latent linears
    multiple_of: int = 4  # SwiGLU hidden width rounding
    norm_eps: float = 1e-8  # LayerNorm epsilon
    attention_backend: Backend = "auto"  # auto | sdpa | flash | reference

    # Old field names, still accepted in YAML and export config.json (models.config_names).
    DEPRECATED_NAMES: ClassVar[dict[str, str]] = {"num_inducing_points": "num_latent_tokens"}

    def __post_init__(self) -> None:
        """Check enums and cross-field constraints."""
        self.checkpoint_decode = normalise_switch(self.checkpoint_decode)
        checks = [
            (self.count_embedding in COUNT_EMBEDDINGS, f"count_embedding {self.count_embedding}"),
            (self.posterior in ("deterministic", "gaussian"), f"posterior {self.posterior}"),
            (self.likelihood in LIKELIHOODS, f"likelihood {self.likelihood}"),
            (self.attention_backend in BACKENDS, f"attention_backend {self.attention_backend}"),
            (self.num_genes > 0, "num_genes must be > 0"),
            (self.embed_dim % self.num_heads == 0, "embed_dim % num_heads != 0"),
            (self.embed_dim % self.num_cross_heads == 0, "embed_dim % num_cross_heads != 0"),
            (self.num_latent_tokens > 0 and self.decode_chunk > 0, "M, decode_chunk > 0"),
            (self.beta >= 0 and self.logvar_min < self.logvar_max, "beta/logvar bounds"),
            (not self.latent_positions or self.embed_dim % 2 == 0, "sin-cos needs even E"),
            (self.checkpoint_decode in CHECKPOINT_DECODE, "checkpoint_decode auto|true|false"),
            (self.decode_memory_mb > 0 and self.sampled_zeros >= 0, "decode budget, sampled_zeros"),
            (self.sampled_normaliser in ("estimated", "exact"), "sampled_normaliser"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError(f"invalid VAEConfig: {bad}")


@dataclass
class VAELoss:
    """Result of :meth:`VAE.loss`.

    Attributes:
        total: scalar to minimise, nll + β·kl.
        nll: −log p(x | z) summed over decoded genes, averaged over cells.
        kl: KL(q || N(0, I)) summed over tokens and dims, averaged over cells (0 if deterministic).
        metrics: detached scalars for logging.
    """

    total: Tensor
    nll: Tensor
    kl: Tensor
    metrics: dict[str, Tensor]


def _block_kwargs(config: VAEConfig) -> dict:
    return {
        "bias": config.bias,
        "dropout": config.dropout,
        "multiple_of": config.multiple_of,
        "norm_eps": config.norm_eps,
        "backend": config.attention_backend,
    }


class Encoder(nn.Module):
    """MCAB pooling of gene tokens into M latent tokens, self-attention stack, latent head."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        E, M, D = config.embed_dim, config.num_latent_tokens, config.latent_dim
        kw = _block_kwargs(config)
        self.ca_layer = CrossAttentionBlock(E, config.num_cross_heads, num_inducing_points=M, **kw)
        self.pos_embed = None
        if config.latent_positions:  # frozen, filled (REF declares it but leaves it at zero)
            table = sincos_embedding_1d(M, E).unsqueeze(0)  # (1, M, E)
            self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.encoder_layers = nn.ModuleList(
            [Block(E, config.num_heads, **kw) for _ in range(config.num_layers)]
        )
        self.encoder_latent_input = nn.Sequential(
            nn.Linear(E, D, bias=config.bias),
            nn.LayerNorm(D, eps=config.norm_eps, elementwise_affine=False),
        )
        self.encoder_logvar = None
        if config.posterior == "gaussian":
            self.encoder_logvar = nn.Linear(E, D, bias=True)

    def forward(
        self,
        tokens: Tensor,
        mask: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Tokens (B, S, E) + mask, or packed (T, E) + cu_seqlens -> (μ, h) with μ (B, M, D).

        Returns:
            μ (B, M, D) fp32 (per-token LayerNorm in fp32) and h (B, M, E) for a logvar head.
        """
        x = self.ca_layer(tokens, None, mask, cu_seqlens_k=cu_seqlens, max_seqlen_k=max_seqlen)
        if self.pos_embed is not None:
            x = x + self.pos_embed  # (B, M, E)
        for layer in self.encoder_layers:
            x = layer(x)  # (B, M, E)
        lin, norm = self.encoder_latent_input
        pre = lin(x)  # (B, M, D)
        with fp32_island(pre):
            mu = F.layer_norm(pre.float(), norm.normalized_shape, eps=norm.eps)
        return mu, x


class Decoder(nn.Module):
    """Latent trunk (LN, Linear D->E, self-attention stack) and the gene-query block."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        E, D = config.embed_dim, config.latent_dim
        kw = _block_kwargs(config)
        self.gene_embedding = (
            nn.Identity() if config.shared_embedding else nn.Embedding(config.num_genes + 1, E)
        )
        self.decoder_latent_input = nn.Sequential(
            nn.LayerNorm(D, eps=config.norm_eps, elementwise_affine=False),
            nn.Linear(D, E, bias=config.bias),
        )
        self.decoder_layers = nn.ModuleList(
            [Block(E, config.num_heads, **kw) for _ in range(config.num_layers)]
        )
        self.decoder_cross_attention = CrossAttentionBlock(E, config.num_cross_heads, **kw)

    def context(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, M, D) -> projected keys/values of the gene-query attention, 2 x (B, M, H, Dh)."""
        norm, lin = self.decoder_latent_input
        with fp32_island(z):
            zn = F.layer_norm(z.float(), norm.normalized_shape, eps=norm.eps)  # (B, M, D)
        x = lin(zn)  # (B, M, E)
        for layer in self.decoder_layers:
            x = layer(x)  # (B, M, E)
        block = self.decoder_cross_attention
        return block.attn.project_kv(block.ln_1(x))  # (B, M, H, Dh) each

    def genes(self, queries: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Gene queries (1|B, c, E) against the latent k/v -> (B, c, E).

        With shared queries (leading dim 1), LN_q(E[g]) W_q is computed once for all cells.
        """
        block = self.decoder_cross_attention
        q, qh = block.queries(queries)  # (1|B, c, E), (1|B, H, c, Dh)
        return block.finish(q, block.attn.attend(qh, k, v))  # (B, c, E)


class VAE(Pretrained, nn.Module):
    """scLDM VAE: encode cells to z (B, M, D), decode per-gene NB (or Gaussian) parameters.

    Args:
        config: the model configuration.
    """

    model_type: ClassVar[str] = "vae"  # config.json model_type (models.export_format)
    config_class: ClassVar[type] = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.input_layer = InputLayer(config.num_genes, config.embed_dim, config.count_embedding)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.decoder_head = LikelihoodHead(config.num_genes, config.embed_dim, config.likelihood)

    # ----- encoder -----------------------------------------------------------------------------
    def _encode(self, batch: CellBatch) -> tuple[Tensor, Tensor | None]:
        """-> μ (B, M, D) fp32 and clamped log σ² (B, M, D) or None."""
        tokens = self.input_layer(batch.gene_ids, batch.counts)  # (T, E) or (B, S, E)
        if batch.is_packed:
            mu, h = self.encoder(tokens, None, batch.cu_seqlens, batch.max_seqlen)
        else:
            mu, h = self.encoder(tokens, batch.mask)
        if self.encoder.encoder_logvar is None:
            return mu, None
        lv = self.encoder.encoder_logvar(h).float()  # (B, M, D)
        return mu, lv.clamp(self.config.logvar_min, self.config.logvar_max)

    def encode(self, batch: CellBatch) -> Tensor:
        """Posterior mean z (B, M, D), fp32. The diffusion stage trains on this."""
        return self._encode(batch)[0]

    # ----- decoder -----------------------------------------------------------------------------
    def _queries(self, gene_ids: Tensor) -> Tensor:
        table = self.decoder.gene_embedding
        if isinstance(table, nn.Identity):
            table = self.input_layer.gene_embedding
        q = table(gene_ids)  # (c, E) or (B, c, E)
        return q.unsqueeze(0) if gene_ids.dim() == 1 else q

    def gene_logits(self, k: Tensor, v: Tensor, gene_ids: Tensor) -> Tensor:
        """Decoder logits (B, c) fp32 of one chunk: k/v (B, M, H, Dh), gene_ids (c,) or (B, c).

        The gene-query block: about 78% of a training step. `precision.compile=on` compiles it.
        """
        h = self.decoder.genes(self._queries(gene_ids), k, v)  # (B, c, E)
        return self.decoder_head.logits(h)  # (B, c)

    def _all_genes(self, device: torch.device) -> Tensor:
        return torch.arange(1, self.config.num_genes + 1, device=device)  # (V,)

    def checkpoints_decode(self, rows: int, device: torch.device) -> bool:
        """Whether a training decode of `rows` (cell, gene) rows recomputes in backward."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        cfg = self.config
        kind = device.type
        half = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) != torch.float32
        size = decode_activation_bytes(
            cfg.embed_dim, cfg.num_cross_heads, cfg.multiple_of, rows, half
        )
        return should_checkpoint(cfg.checkpoint_decode, size, cfg.decode_memory_mb)

    def _logit_chunks(self, z: Tensor, gene_ids: Tensor | None, chunk: int | None):
        """Yield (start, end, gene_ids chunk, logits (B, c) fp32) over the decoded genes."""
        gene_ids = self._all_genes(z.device) if gene_ids is None else gene_ids.to(z.device)
        chunk = chunk or self.config.decode_chunk
        k, v = self.decoder.context(z)  # (B, M, H, Dh), computed once for all chunks
        G = gene_ids.shape[-1]
        use_ckpt = self.checkpoints_decode(z.shape[0] * G, z.device)
        for s in range(0, G, chunk):
            ids = gene_ids[..., s : s + chunk]  # (c,) or (B, c)
            if use_ckpt:
                lg = checkpoint(self.gene_logits, k, v, ids, use_reentrant=False)
            else:
                lg = self.gene_logits(k, v, ids)
            yield s, s + ids.shape[-1], ids, lg

    def decode_logits(
        self, z: Tensor, gene_ids: Tensor | None = None, chunk: int | None = None
    ) -> Tensor:
        """Per-gene head outputs (B, G) fp32, decoded ``chunk`` genes at a time.

        Args:
            z: (B, M, D) latents.
            gene_ids: (G,) shared or (B, G) per-cell tokens (no PAD); default all 1..V.
            chunk: genes per chunk (default ``config.decode_chunk``).
        """
        return torch.cat([lg for *_, lg in self._logit_chunks(z, gene_ids, chunk)], dim=-1)

    def _samples_genes(self, batch: CellBatch, gene_ids: Tensor | None) -> bool:
        """Gene-sampled decode: asked for, training with gradients, decoding every gene, and
        cheaper than the full decode (fewer rows: the longest cell's genes + k < G)."""
        k = self.config.sampled_zeros
        on = k > 0 and gene_ids is None and batch.max_seqlen + k < self.config.num_genes
        return on and self.training and torch.is_grad_enabled()

    # ----- likelihood --------------------------------------------------------------------------
    def _nll(self, z: Tensor, batch: CellBatch, gene_ids: Tensor | None) -> Tensor:
        """−log p(x | z) per cell (B,), summed over the decoded genes."""
        lse, parts = StreamingLogSumExp(), []
        for s, e, ids, lg in self._logit_chunks(z, gene_ids, None):
            lse.update(lg)
            parts.append((s, e, ids, lg))
        norm = lse.result() if self.decoder_head.theta is not None else None  # (B,)
        total = z.new_zeros(z.shape[0], dtype=torch.float32)  # (B,)
        for s, e, ids, lg in parts:
            x = batch.dense_target_chunk(s + 1, e + 1) if gene_ids is None else None
            x = batch.dense_target(ids) if x is None else x  # (B, c)
            lp = self.decoder_head.log_prob(x, lg, norm, batch.library_size, ids)  # (B, c)
            total = total - lp.sum(dim=-1)
        return total

    def forward(
        self,
        batch: CellBatch,
        gene_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> VAELoss:
        """Training loss (see `loss`); a module call, so ZeRO-3's top-level hooks run."""
        return self.loss(batch, gene_ids, generator)

    def loss(
        self,
        batch: CellBatch,
        gene_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> VAELoss:
        """Training loss: NLL summed over decoded genes, averaged over cells, + β·KL.

        Args:
            batch: the cells.
            gene_ids: (G,) genes to decode (default: the whole vocabulary).
            generator: draws the sampled genes under ``sampled_zeros`` (default: global RNG).
        """
        mu, logvar = self._encode(batch)
        z, kl = mu, mu.new_zeros(())
        if logvar is not None:
            if self.training:
                z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)  # (B, M, D)
            kl_cell = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2))  # (B,)
            kl = kl_cell.mean()
        if self._samples_genes(batch, gene_ids):
            nll = sampled_nll(self, z, batch, generator).mean()
        else:
            nll = self._nll(z, batch, gene_ids).mean()
        total = nll + self.config.beta * kl
        G = self.config.num_genes if gene_ids is None else gene_ids.shape[-1]
        metrics = {"nll": nll.detach(), "kl": kl.detach(), "nll_per_gene": nll.detach() / G}
        return VAELoss(total=total, nll=nll, kl=kl, metrics=metrics)

    # ----- generation and validation -------------------------------------------------------------
    @torch.no_grad()
    def sample_counts(
        self,
        z: Tensor,
        library_size: Tensor,
        gene_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample counts given z: two chunked passes (normaliser, then sampling), CSR output.

        Args:
            z: (B, M, D) latents.
            library_size: (B,) ℓ used for μ = softmax · ℓ.
            gene_ids: (G,) genes to decode (default 1..V); column j of the output is gene_ids[j].
            generator: RNG for reproducible samples.

        Returns:
            (B, G) float32 sparse CSR tensor (NB counts, or log1p-CP10k values for gaussian).
        """
        lse = None
        if self.decoder_head.theta is not None:
            acc = StreamingLogSumExp()
            for *_, lg in self._logit_chunks(z, gene_ids, None):
                acc.update(lg)
            lse = acc.result()  # (B,)
        rows, cols, vals = [], [], []
        G = 0
        for s, e, ids, lg in self._logit_chunks(z, gene_ids, None):
            x = self.decoder_head.sample(lg, lse, library_size.to(z.device), ids, generator)
            r, c = torch.nonzero(x, as_tuple=True)  # nnz of this (B, c) chunk
            rows.append(r), cols.append(c + s), vals.append(x[r, c])
            G = e
        r, c, val = torch.cat(rows), torch.cat(cols), torch.cat(vals)  # (nnz,)
        order = torch.argsort(r * G + c)  # row-major
        crow = F.pad(torch.cumsum(torch.bincount(r, minlength=z.shape[0]), 0), (1, 0))  # (B+1,)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, c[order], val[order], (z.shape[0], G))

    @torch.no_grad()
    def reconstruction_metrics(
        self,
        batch: CellBatch,
        gene_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, float]:
        """Validation metrics (REF semantics) between an NB sample from z = μ and the data.

        Returns:
            ``mse`` over entries and ``pearson`` per gene across cells (nan-mean), both on
            log1p(CP10k); ``zero_agreement`` of zero/non-zero patterns; ``nll`` per cell.
        """
        z = self.encode(batch)
        nll = self._nll(z, batch, gene_ids).mean()
        sample = self.sample_counts(z, batch.library_size, gene_ids, generator).to_dense()
        if gene_ids is None:
            obs = batch.dense_target_chunk(1, self.config.num_genes + 1)  # (B, V)
        else:
            obs = batch.dense_target(gene_ids)  # (B, G)
        is_nb = self.decoder_head.theta is not None  # gaussian samples are already log1p CP10k
        a = log1p_cp10k(sample, sample.sum(dim=1)) if is_nb else sample  # (B, G)
        b = log1p_cp10k(obs, obs.sum(dim=1))  # (B, G)
        ac, bc = a - a.mean(dim=0), b - b.mean(dim=0)  # (B, G)
        r = (ac * bc).sum(dim=0) / torch.sqrt(ac.square().sum(dim=0) * bc.square().sum(dim=0))
        return {
            "mse": float((a - b).square().mean()),
            "pearson": float(torch.nanmean(r)),
            "zero_agreement": float(((sample > 0) == (obs > 0)).float().mean()),
            "nll": float(nll),
        }

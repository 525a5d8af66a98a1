"""Analytic FLOP counts of the VAE and the DiT, pure arithmetic.

Architectures: docs/model.md, 'VAE', 'Latent DiT' and 'Numerics and memory'.

Shape legend (docs/model.md, 'Notation'):
    B   cells in a micro-batch        S   expressed genes of a cell (encoder set size)
    G   decoded genes                 M   latent tokens
    D   latent width per token        E   VAE width           W   DiT width
    F   SwiGLU hidden width           L   blocks per stack

Only matrix products are counted, each as 2·m·n·k FLOPs (one multiply-add = 2 FLOPs), which is
what ``torch.utils.flop_counter.FlopCounterMode`` counts; norms, softmax, elementwise work,
embedding lookups and the NB lgamma terms are left out. Counts are split into terms paid per
cell and terms paid once per micro-batch (cell-independent work the models hoist: the projected
MCAB inducing points and the projected decoder gene queries), so a micro-batch of B cells costs
``B * sum(per_cell) + sum(per_step)``.

Training is counted as 3 x forward (backward = gradients with respect to inputs and weights,
two products per forward product). Gene-chunked decoding with activation checkpointing
recomputes the per-gene decoder forward during backward; :func:`vae_train_flops` reports that
recompute as a separate term so model FLOPs and hardware FLOPs can both be read off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # type hints only: this module does not need torch at run time
    from atlasldm.models.dit import DiTConfig
    from atlasldm.models.vae import VAEConfig

TRAIN_FACTOR = 3  # forward + backward ≈ 3 x forward (two products per product in backward)
# Encoder count embeddings (docs/model.md, 'Count embeddings') that are elementwise, i.e. cost
# no matmul FLOPs.
_ELEMENTWISE_EMBEDDINGS = ("log1p_mul", "log1pzero", "anscombe", "sqrt")
_SOFTBIN_HIDDEN, _SOFTBIN_BINS = 64, 10  # models.embeddings_count.SoftBinProjection defaults


def swiglu_hidden(dim: int, multiple_of: int = 4) -> int:
    """SwiGLU hidden width F (same rule as ``models.layers.swiglu_hidden_dim``)."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class FlopCount:
    """Named FLOP terms: ``per_cell`` (paid by every cell) and ``per_step`` (once per batch)."""

    per_cell: dict[str, float] = field(default_factory=dict)
    per_step: dict[str, float] = field(default_factory=dict)

    def cell_total(self) -> float:
        """FLOPs per cell, excluding the per-step terms."""
        return float(sum(self.per_cell.values()))

    def total(self, cells: int) -> float:
        """FLOPs of a micro-batch of ``cells`` cells: cells * per_cell + per_step."""
        return cells * self.cell_total() + float(sum(self.per_step.values()))

    def terms(self, cells: int) -> dict[str, float]:
        """Every term's FLOPs for a micro-batch of ``cells`` cells (names prefixed by kind)."""
        out = {f"cell:{k}": cells * v for k, v in self.per_cell.items()}
        out.update({f"step:{k}": float(v) for k, v in self.per_step.items()})
        return out

    def scaled(self, factor: float) -> FlopCount:
        """Every term multiplied by ``factor`` (e.g. :data:`TRAIN_FACTOR`)."""
        return FlopCount(
            {k: factor * v for k, v in self.per_cell.items()},
            {k: factor * v for k, v in self.per_step.items()},
        )

    def merged(self, other: FlopCount, prefix: str = "") -> FlopCount:
        """This count plus ``other``, whose term names get ``prefix``."""
        cell = dict(self.per_cell) | {prefix + k: v for k, v in other.per_cell.items()}
        step = dict(self.per_step) | {prefix + k: v for k, v in other.per_step.items()}
        return FlopCount(cell, step)


def _self_attention_stack(layers: int, tokens: int, width: int, hidden: int) -> dict[str, float]:
    """Pre-LN self-attention blocks (fused QKV, SDPA, output proj, SwiGLU) over ``tokens``."""
    L, T, E, F = layers, tokens, width, hidden
    return {
        "qkv": L * 2 * T * E * 3 * E,
        "attention": L * 4 * T * T * E,  # Q K^T and A V, summed over heads
        "attn_out": L * 2 * T * E * E,
        "mlp": L * 6 * T * E * F,  # w1, w2 (E -> F) and c_proj (F -> E)
    }


def _count_embedding_flops(kind: str, S: int, E: int) -> float:
    """Matmul FLOPs of the count embedding over S tokens (docs/model.md, 'Count embeddings')."""
    if kind in _ELEMENTWISE_EMBEDDINGS:
        return 0.0
    if kind == "proj":  # Linear(1 -> E)
        return 2.0 * S * E
    if kind == "projconcat":  # Linear(2E -> E)
        return 2.0 * S * 2 * E * E
    if kind == "softbin":  # MLP 1 -> 64 -> 10, then soft weights @ (10, E) bin table
        h, k = _SOFTBIN_HIDDEN, _SOFTBIN_BINS
        return 2.0 * S * (h + h * k + k * E)
    raise ValueError(f"unknown count embedding {kind!r}")


def vae_encoder_flops(cfg: VAEConfig, S: int) -> FlopCount:
    """Encoder forward for a cell with S gene tokens (S = padded length on the padded path)."""
    E, M, D = cfg.embed_dim, cfg.num_latent_tokens, cfg.latent_dim
    F = swiglu_hidden(E, cfg.multiple_of)
    cell = {
        "count_embedding": _count_embedding_flops(cfg.count_embedding, S, E),
        "mcab_kv": 2.0 * S * E * 2 * E,  # LN(X) -> K, V
        "mcab_attention": 4.0 * M * S * E,  # M queries against S keys
        "mcab_out": 2.0 * M * E * E,
        "mcab_mlp": 6.0 * M * E * F,
    }
    stack = _self_attention_stack(cfg.num_layers, M, E, F)
    cell.update({f"layers_{k}": float(v) for k, v in stack.items()})
    cell["latent_head"] = 2.0 * M * E * D
    if cfg.posterior == "gaussian":
        cell["logvar_head"] = 2.0 * M * E * D
    step = {"mcab_q": 2.0 * M * E * E}  # inducing points are shared by every cell
    return FlopCount(cell, step)


def vae_decoder_context_flops(cfg: VAEConfig) -> FlopCount:
    """Decoder work on the M latent tokens (independent of G): input linear, stack, K/V."""
    E, M, D = cfg.embed_dim, cfg.num_latent_tokens, cfg.latent_dim
    F = swiglu_hidden(E, cfg.multiple_of)
    cell = {"latent_input": 2.0 * M * D * E}
    stack = _self_attention_stack(cfg.num_layers, M, E, F)
    cell.update({f"layers_{k}": float(v) for k, v in stack.items()})
    cell["cross_kv"] = 2.0 * M * E * 2 * E
    return FlopCount(cell, {})


def vae_decoder_gene_flops(cfg: VAEConfig, G: int) -> FlopCount:
    """Decoder work per decoded gene (the part run, and recomputed, chunk by chunk)."""
    E, M = cfg.embed_dim, cfg.num_latent_tokens
    F = swiglu_hidden(E, cfg.multiple_of)
    cell = {
        "gene_attention": 4.0 * G * M * E,  # G gene queries against M latent keys
        "gene_out": 2.0 * G * E * E,
        "gene_mlp": 6.0 * G * E * F,
        "head": 2.0 * G * E,  # Linear(E -> 1)
    }
    step = {"gene_q": 2.0 * G * E * E}  # LN_q(E[g]) W_q once per step (docs/model.md, 'Decoder')
    return FlopCount(cell, step)


def vae_forward_flops(cfg: VAEConfig, S: int, G: int) -> FlopCount:
    """VAE forward (encode S tokens, decode G genes); terms prefixed ``enc.`` and ``dec.``."""
    dec = vae_decoder_context_flops(cfg).merged(vae_decoder_gene_flops(cfg, G))
    return FlopCount().merged(vae_encoder_flops(cfg, S), "enc.").merged(dec, "dec.")


def vae_train_flops(cfg: VAEConfig, S: int, G: int, recompute: bool = False) -> FlopCount:
    """VAE training step = 3 x forward; ``recompute`` adds the checkpointed decoder re-forward."""
    out = vae_forward_flops(cfg, S, G).scaled(TRAIN_FACTOR)
    if recompute:
        again = vae_decoder_gene_flops(cfg, G)
        out.per_cell["dec.recompute"] = again.cell_total()
        out.per_step["dec.recompute"] = float(sum(again.per_step.values()))
    return out


def dit_forward_flops(cfg: DiTConfig) -> FlopCount:
    """DiT forward per cell (M tokens of width W); independent of S and G."""
    M, D, W = cfg.num_latent_tokens, cfg.latent_dim, cfg.embed_dim
    F = swiglu_hidden(W, cfg.multiple_of)
    L = cfg.num_layers
    cell = {
        "timestep_mlp": 2.0 * (cfg.time_freq_dim * W + W * W),
        "input_proj": 2.0 * M * D * W,
        "adaln": L * 2.0 * W * 6 * W,  # one condition vector per cell, not per token
    }
    stack = _self_attention_stack(L, M, W, F)
    cell.update({f"layers_{k}": float(v) for k, v in stack.items()})
    cell["final_adaln"] = 2.0 * W * 2 * W
    cell["final_linear"] = 2.0 * M * W * D
    return FlopCount(cell, {})


def dit_train_flops(cfg: DiTConfig) -> FlopCount:
    """DiT training step per cell = 3 x forward (latents z are inputs: encode not included)."""
    return dit_forward_flops(cfg).scaled(TRAIN_FACTOR)


def vae_linear_form(cfg: VAEConfig, factor: float = 1.0) -> dict[str, float]:
    """Per-cell VAE FLOPs as ``per_S * S + per_G * G + const`` (+ ``step_per_G * G`` per step).

    The count is exactly linear in S and G at fixed widths, so three evaluations give it.
    """
    base = vae_forward_flops(cfg, 0, 0)
    s1, g1 = vae_forward_flops(cfg, 1, 0), vae_forward_flops(cfg, 0, 1)
    step0 = sum(base.per_step.values())
    return {
        "per_S": factor * (s1.cell_total() - base.cell_total()),
        "per_G": factor * (g1.cell_total() - base.cell_total()),
        "const": factor * base.cell_total(),
        "step_per_G": factor * (sum(g1.per_step.values()) - step0),
        "step_const": factor * step0,
    }

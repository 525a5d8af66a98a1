"""Latent Diffusion Transformer (adaLN-Zero DiT) predicting the flow velocity.

Spec: docs/model.md, 'Latent DiT' and 'Conditioning and null tokens'.

Shape legend (docs/model.md, 'Notation'):
    B  cells
    M  latent tokens (the VAE's num_latent_tokens)
    D  latent width per token
    W  DiT width (embed_dim)
    A  condition attributes; labels (B, A) int64, code vocab_a is attribute a's null token

Parameter names follow the scLDM reference (`input_proj`, `pos_embed`, `t_embedder.mlp`,
`blocks.i.{ln_1, attn.c_attn, attn.c_proj, mlp.w1, mlp.w2, mlp.c_proj, adaln_modulation.1}`,
`final_layer.{adaln_modulation.1, linear}`) so its checkpoints map key for key; only its label
tables (a dict by attribute name) become `cond_embedder.tables.<index>`. REF below is that
reference implementation (docs/model.md, 'Tags').
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from atlasldm.models.attention import BACKENDS, Backend, SelfAttention
from atlasldm.models.embeddings import (
    CFG_DROPOUT_SCHEMES,
    CfgDropoutScheme,
    ConditionEmbedder,
    TimestepEmbedder,
    drop_conditions,
)
from atlasldm.models.export_format import Pretrained
from atlasldm.models.layers import SwiGLU, modulate, sincos_embedding_1d


@dataclass
class DiTConfig:
    """Hyperparameters of the DiT; defaults are the REF `ldm_base` recipe (`dit_s`)."""

    num_latent_tokens: int = 16  # M: latent tokens, from the VAE export
    latent_dim: int = 16  # D: latent width per token, from the VAE export
    embed_dim: int = 256  # W: transformer width
    num_layers: int = 8  # adaLN-Zero blocks
    num_heads: int = 8  # attention heads (W divisible by it)
    multiple_of: int = 4  # SwiGLU hidden width rounding
    vocab_sizes: list[int] = field(default_factory=list)  # classes per attribute; [] = uncond.
    cfg_dropout_scheme: CfgDropoutScheme = "per_batch_attribute"  # REF `mutually_exclusive`
    cond_drop_prob: float = 0.8  # probability of nulling a condition in training (REF config)
    time_scale: float = 1.0  # factor on t in [0, 1] before the sinusoids (REF: unscaled)
    time_freq_dim: int = 256  # sinusoidal channels of the timestep embedder (REF 256)
    bias: bool = True  # bias on attention, input projection and final layer (REF bias: true)
    norm_eps: float = 1e-8  # LayerNorm epsilon (REF takes the VAE's 1e-8)
    swap_shift_scale: bool = False  # REF block modulate bug; true only to load released weights
    attention_backend: Backend = "auto"  # attention kernel (models.attention)

    # Old field names, still accepted in YAML and export config.json (models.config_names).
    DEPRECATED_NAMES: ClassVar[dict[str, str]] = {
        "latent_tokens": "num_latent_tokens",
        "hidden_dim": "embed_dim",
        "freq_dim": "time_freq_dim",
        "attn_backend": "attention_backend",
    }

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads or self.embed_dim % 2:
            raise ValueError("embed_dim must be even and divisible by num_heads")
        if self.cfg_dropout_scheme not in CFG_DROPOUT_SCHEMES:
            raise ValueError(f"cfg_dropout_scheme must be one of {CFG_DROPOUT_SCHEMES}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
        if any(int(v) < 1 for v in self.vocab_sizes):
            raise ValueError(f"vocab_sizes must be positive, got {self.vocab_sizes}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}")
        if min(self.num_latent_tokens, self.latent_dim, self.num_layers) < 1:
            raise ValueError("num_latent_tokens, latent_dim and num_layers must be >= 1")


def _adaln(width: int, chunks: int, bias: bool = True) -> nn.Sequential:
    """SiLU -> Linear(W -> chunks·W); index 1 is the layer zeroed at init (REF layout)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(width, chunks * width, bias=bias))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + g_a·Attn(mod(LN x)), then x + g_m·SwiGLU(mod(LN x))."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        w = config.embed_dim
        self.ln_1 = nn.LayerNorm(w, eps=config.norm_eps, elementwise_affine=False)
        self.ln_2 = nn.LayerNorm(w, eps=config.norm_eps, elementwise_affine=False)
        heads, backend = config.num_heads, config.attention_backend
        self.attn = SelfAttention(w, heads, bias=config.bias, backend=backend)
        # REF's DiT MLP has no bias whatever `bias` says (its MLP class hard-codes bias=False);
        # the published parameter count (9,745,424) only matches without it.
        self.mlp = SwiGLU(w, multiple_of=config.multiple_of, bias=False)
        self.adaln_modulation = _adaln(w, 6, bias=True)  # REF: always biased in blocks
        self.swap = config.swap_shift_scale

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Return the block output (B, M, W) for tokens x (B, M, W) and condition c (B, 1, W)."""
        mods = self.adaln_modulation(c).chunk(6, dim=-1)  # 6 x (B, 1, W)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        if self.swap:  # REF calls modulate(x, scale, shift): reproduce it for its checkpoints
            shift_a, scale_a, shift_m, scale_m = scale_a, shift_a, scale_m, shift_m
        x = x + gate_a * self.attn(modulate(self.ln_1(x), shift_a, scale_a))  # (B, M, W)
        return x + gate_m * self.mlp(modulate(self.ln_2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN shift/scale (not swapped in REF either) then Linear(W -> D)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        w = config.embed_dim
        self.norm_final = nn.LayerNorm(w, eps=config.norm_eps, elementwise_affine=False)
        self.linear = nn.Linear(w, config.latent_dim, bias=config.bias)
        self.adaln_modulation = _adaln(w, 2, bias=config.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Return (B, M, D) from tokens x (B, M, W) and condition c (B, 1, W)."""
        shift, scale = self.adaln_modulation(c).chunk(2, dim=-1)  # 2 x (B, 1, W)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(Pretrained, nn.Module):
    """Velocity network v(x_t, t, labels) on the latent tokens, conditioned through adaLN."""

    model_type: ClassVar[str] = "dit"  # config.json model_type (models.export_format)
    config_class: ClassVar[type] = DiTConfig

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        w = config.embed_dim
        self.input_proj = nn.Linear(config.latent_dim, w, bias=config.bias)
        # Frozen Parameter rather than buffer: REF stores it as one, so state dicts and the
        # published parameter count include it.
        positions = torch.zeros(1, config.num_latent_tokens, w)  # (1, M, W), filled at init
        self.pos_embed = nn.Parameter(positions, requires_grad=False)
        self.t_embedder = TimestepEmbedder(w, config.time_freq_dim, config.time_scale)
        self.cond_embedder = ConditionEmbedder(config.vocab_sizes, w)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.num_layers))
        self.final_layer = FinalLayer(config)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Xavier linears, sin-cos positions, N(0, 0.02) tables and time MLP, zeroed adaLN/out."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        m, w = self.config.num_latent_tokens, self.config.embed_dim
        self.pos_embed.copy_(sincos_embedding_1d(m, w))
        for table in self.cond_embedder.tables:
            nn.init.normal_(table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: gates start at 0, so every block is the identity and the output is 0.
        zeroed = [blk.adaln_modulation[1] for blk in self.blocks]
        zeroed += [self.final_layer.adaln_modulation[1], self.final_layer.linear]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def condition(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Return c = TimestepEmbedder(t) + Σ_a Emb_a[labels_a] as (B, 1, W)."""
        c = self.t_embedder(t) + self.cond_embedder(labels, t.shape[0])  # (B, W)
        return c.unsqueeze(1)  # (B, 1, W): broadcasts over the M tokens

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the velocity (B, M, D) for x (B, M, D), t (B,), labels (B, A) or None (= null).

        Condition dropout is not applied here: the training step calls `drop_labels` first, so
        the forward is deterministic and evaluation needs no train/eval switch.
        """
        m, d = self.config.num_latent_tokens, self.config.latent_dim
        if x.dim() != 3 or x.shape[1:] != (m, d):
            raise ValueError(f"x must be (B, {m}, {d}), got {tuple(x.shape)}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        c = self.condition(t, labels)  # (B, 1, W)
        h = self.input_proj(x) + self.pos_embed  # (B, M, W)
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h, c)  # (B, M, D)

    def drop_labels(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Return labels (B, A) after the configured condition dropout (see `drop_conditions`)."""
        cfg = self.config
        return drop_conditions(
            labels, cfg.vocab_sizes, cfg.cfg_dropout_scheme, cfg.cond_drop_prob, generator
        )

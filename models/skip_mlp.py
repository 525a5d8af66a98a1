"""scDiffusion-style skip-connected MLP denoiser on the flattened latent.

Spec: docs/model.md, 'MLP denoiser'.

A drop-in alternative to the DiT: same forward signature `(x, t, labels) -> v`, same flow
objective and samplers. Differences from scDiffusion's `MLP` (all OURS): separate LayerNorms per
layer (it shares one between layers of equal width), no unused dropout, widths fully
configurable (it ignores the 4th entry of its list), optional condition embeddings summed with
the time embedding so CFG works, and a zero-initialised output layer (the denoiser starts at 0).

Shape legend (docs/model.md, 'Notation'):
    B  cells
    M  latent tokens
    D  latent width per token
    N  flattened latent width M·D
    H  hidden widths of the layers; H0 is also the time-embedding width
    A  condition attributes; labels (B, A) int64
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from atlasldm.models.embeddings import (
    CFG_DROPOUT_SCHEMES,
    CfgDropoutScheme,
    ConditionEmbedder,
    TimestepEmbedder,
    drop_conditions,
)
from atlasldm.models.export_format import Pretrained


@dataclass
class SkipMLPConfig:
    """Hyperparameters of the skip-connected MLP denoiser (scDiffusion widths by default)."""

    num_latent_tokens: int = 16  # M: latent tokens, from the VAE export
    latent_dim: int = 16  # D: latent width per token, from the VAE export
    hidden_dims: list[int] = field(default_factory=lambda: [2000, 1000, 500])  # down path widths
    head_dim: int = 2000  # width of the output head's hidden layer
    time_freq_dim: int | None = None  # sinusoidal channels; None = hidden_dims[0] (scDiffusion)
    time_scale: float = 1000.0  # t in [0, 1] scaled like scDiffusion's integer DDPM steps
    vocab_sizes: list[int] = field(default_factory=list)  # classes per attribute; [] = uncond.
    cfg_dropout_scheme: CfgDropoutScheme = "per_batch_attribute"  # see models.embeddings
    cond_drop_prob: float = 0.8  # probability of nulling a condition in training
    norm_eps: float = 1e-5  # LayerNorm epsilon (torch default, as scDiffusion)

    # Old field names, still accepted in YAML and export config.json (models.config_names).
    DEPRECATED_NAMES: ClassVar[dict[str, str]] = {"latent_tokens": "num_latent_tokens"}

    def __post_init__(self) -> None:
        if not self.hidden_dims or min(self.hidden_dims) < 1 or self.head_dim < 1:
            raise ValueError("hidden_dims must be non-empty and positive; head_dim positive")
        if self.cfg_dropout_scheme not in CFG_DROPOUT_SCHEMES:
            raise ValueError(f"cfg_dropout_scheme must be one of {CFG_DROPOUT_SCHEMES}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")


class TimeConditionedLayer(nn.Module):
    """SiLU(LayerNorm(Linear(x) + Linear(SiLU(emb)))): scDiffusion's layer with time projection.

    Args:
        in_dim: input width.
        out_dim: output width.
        emb_dim: width of the time(+condition) embedding.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, in_dim: int, out_dim: int, emb_dim: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_dim))
        self.norm = nn.LayerNorm(out_dim, eps=norm_eps)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Return (B, out_dim) for x (B, in_dim) and emb (B, emb_dim)."""
        return self.act(self.norm(self.fc(x) + self.emb(emb)))


class SkipMLP(Pretrained, nn.Module):
    """Velocity network on the flattened latent with a U-shaped skip-connected MLP."""

    model_type: ClassVar[str] = "skip_mlp"  # config.json model_type (models.export_format)
    config_class: ClassVar[type] = SkipMLPConfig

    def __init__(self, config: SkipMLPConfig) -> None:
        super().__init__()
        self.config = config
        dims = list(config.hidden_dims)
        n_in, h0 = config.num_latent_tokens * config.latent_dim, dims[0]
        freq = config.time_freq_dim or h0
        self.t_embedder = TimestepEmbedder(h0, freq, config.time_scale)
        self.cond_embedder = ConditionEmbedder(config.vocab_sizes, h0)
        eps = config.norm_eps
        ins = [n_in, *dims[:-1]]
        self.down = nn.ModuleList(
            TimeConditionedLayer(ins[i], dims[i], h0, eps) for i in range(len(dims))
        )
        # Up path mirrors the down path: widths dims[-2], ..., dims[0].
        ups = reversed(range(len(dims) - 1))
        self.up = nn.ModuleList(TimeConditionedLayer(dims[i + 1], dims[i], h0, eps) for i in ups)
        self.head = nn.Sequential(
            nn.Linear(h0, config.head_dim),
            nn.LayerNorm(config.head_dim, eps=eps),
            nn.SiLU(),
            nn.Linear(config.head_dim, n_in),
        )
        # Zero output: the initial velocity is 0, like the DiT's adaLN-Zero start.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the velocity (B, M, D) for x (B, M, D), t (B,), labels (B, A) or None (= null)."""
        shape = x.shape
        if t.dim() == 0:
            t = t.expand(shape[0])
        emb = self.t_embedder(t) + self.cond_embedder(labels, shape[0])  # (B, H0)
        h = x.reshape(shape[0], -1)  # (B, N)
        skips = []
        for layer in self.down:
            h = layer(h, emb)  # (B, H_i)
            skips.append(h)
        skips.pop()  # the bottleneck output feeds the up path directly
        for layer in self.up:
            h = layer(h, emb) + skips.pop()  # (B, H_{i}) + matching down output
        return self.head(h).reshape(shape)  # (B, N) -> (B, M, D)

    def drop_labels(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Return labels (B, A) after the configured condition dropout (see `drop_conditions`)."""
        cfg = self.config
        return drop_conditions(
            labels, cfg.vocab_sizes, cfg.cfg_dropout_scheme, cfg.cond_drop_prob, generator
        )

"""Timestep and condition embeddings, null tokens and condition dropout for the denoisers.

Shape legend (docs/model.md, 'Notation'):
    B  cells in a micro-batch
    A  condition attributes; labels are (B, A) int64, code == vocab_sizes[a] is attribute a's null
    W  width of the embedding (DiT width, or the skip-MLP / classifier time width)
    F  number of sinusoidal frequency channels fed to the timestep MLP

REF is the reference implementation (docs/model.md, 'Tags').
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from atlasldm.models.layers import timestep_embedding

CfgDropoutScheme = Literal["joint", "per_batch_attribute", "independent"]
CFG_DROPOUT_SCHEMES: tuple[str, ...] = ("joint", "per_batch_attribute", "independent")


class TimestepEmbedder(nn.Module):
    """Maps t (B,) to (B, W): [cos | sin] features of `time_scale * t`, then Linear-SiLU-Linear.

    Args:
        dim: output width W.
        freq_dim: number of sinusoidal channels F (REF 256).
        time_scale: factor applied to t before the sinusoids. REF feeds t in [0, 1] unscaled
            (1.0); scDiffusion feeds integer DDPM steps, which our MLP denoisers mimic with 1000.
        hidden_dim: width of the MLP's hidden layer (default W; scDiffusion's classifier differs).
    """

    def __init__(
        self, dim: int, freq_dim: int = 256, time_scale: float = 1.0, hidden_dim: int | None = None
    ) -> None:
        super().__init__()
        hidden = dim if hidden_dim is None else hidden_dim
        # Index names match REF (`t_embedder.mlp.0` / `.mlp.2`) so its weights load by key.
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.freq_dim = freq_dim
        self.time_scale = time_scale

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Return the embedding (B, W) of times t (B,)."""
        # fp32 features so bf16 autocast cannot alias nearby times.
        feats = timestep_embedding(t.float() * self.time_scale, self.freq_dim)  # (B, F)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class ConditionEmbedder(nn.Module):
    """Sum of per-attribute label embeddings; each table has vocab_a + 1 rows, the last is null.

    Args:
        vocab_sizes: class count of each attribute (empty: unconditional, the output is zero).
        dim: embedding width W.
    """

    def __init__(self, vocab_sizes: Sequence[int], dim: int) -> None:
        super().__init__()
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.dim = dim
        self.tables = nn.ModuleList(nn.Embedding(v + 1, dim) for v in self.vocab_sizes)
        # Follows .to(device/dtype) even with no tables (A = 0), so the zero output lands on the
        # model's device; not saved in state dicts.
        self.register_buffer("anchor", torch.zeros(0), persistent=False)

    def forward(self, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Return Σ_a Emb_a[labels[:, a]] as (B, W); labels None means every attribute null."""
        if labels is None:
            labels = null_labels(self.vocab_sizes, batch_size, device=self.anchor.device)
        check_labels(labels, self.vocab_sizes)
        out = self.anchor.new_zeros(batch_size, self.dim)  # (B, W)
        for a, table in enumerate(self.tables):
            out = out + table(labels[:, a])  # (B, W)
        return out


def null_labels(
    vocab_sizes: Sequence[int], batch_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Return the all-null labels (B, A): column a holds vocab_sizes[a]."""
    row = torch.tensor([int(v) for v in vocab_sizes], dtype=torch.long, device=device)
    return row.expand(batch_size, len(vocab_sizes)).clone()


def check_labels(labels: torch.Tensor, vocab_sizes: Sequence[int]) -> None:
    """Raise ValueError unless labels is (B, A) integer with codes in [0, vocab_a] per column."""
    if labels.dim() != 2 or labels.shape[1] != len(vocab_sizes):
        raise ValueError(f"labels must be (B, {len(vocab_sizes)}), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integer codes, got {labels.dtype}")
    # Range check only on CPU: on a GPU it would force a host sync every step, and an
    # out-of-range code fails the embedding lookup there anyway.
    if labels.numel() and labels.device.type == "cpu":
        top = torch.tensor(list(vocab_sizes), device=labels.device)
        if bool(((labels < 0) | (labels > top)).any()):
            raise ValueError(f"label codes outside [0, vocab]; vocab sizes {list(vocab_sizes)}")


def drop_conditions(
    labels: torch.Tensor,
    vocab_sizes: Sequence[int],
    scheme: CfgDropoutScheme,
    prob: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return a copy of labels (B, A) with codes replaced by null tokens for CFG training.

    Schemes (docs/model.md, 'Condition dropout'): `joint` one Bernoulli(prob) per cell nulls
    every attribute;
    `per_batch_attribute` (REF `mutually_exclusive`) picks one attribute for the whole batch,
    nulls all others, and nulls the chosen one per cell with probability prob; `independent`
    nulls each (cell, attribute) with probability prob. Random draws come from `generator`
    (on CPU or the generator's device) in a fixed order, so a run seeded by (seed, step, rank)
    redraws the same nulls after resume. The input tensor is not modified.
    """
    if scheme not in CFG_DROPOUT_SCHEMES:
        raise ValueError(f"unknown cfg_dropout_scheme {scheme!r}; use one of {CFG_DROPOUT_SCHEMES}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {prob}")
    check_labels(labels, vocab_sizes)
    batch, num_attr = labels.shape
    if num_attr == 0:
        return labels.clone()
    null = null_labels(vocab_sizes, batch, device=labels.device)  # (B, A)
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def bernoulli(shape: tuple[int, ...]) -> torch.Tensor:
        u = torch.rand(shape, generator=generator, device=gen_device)
        return (u < prob).to(labels.device)

    if scheme == "joint":
        drop = bernoulli((batch, 1)).expand(batch, num_attr)
    elif scheme == "independent":
        drop = bernoulli((batch, num_attr))
    else:
        chosen = int(torch.randint(num_attr, (1,), generator=generator, device=gen_device))
        drop = torch.ones(batch, num_attr, dtype=torch.bool, device=labels.device)
        drop[:, chosen] = bernoulli((batch,))
    return torch.where(drop, null, labels)

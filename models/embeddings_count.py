"""Gene-and-count token embeddings for the VAE encoder (docs/model.md, 'Count embeddings').

Shape legend:
    ...  any leading token dims: (T,) packed or (B, S) padded
    E    embedding width          V   vocabulary size (tokens 1..V, 0 = PAD)
    K    soft bins (softbin)

Names follow the scLDM reference (``gene_embedding``, ``projection.mix``,
``projection.count_embedding``) so its checkpoints map key for key. REF below is that
reference implementation, PAPER the scLDM paper (docs/model.md, 'Tags').
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

CountEmbedding = Literal[
    "log1p_mul", "log1pzero", "anscombe", "sqrt", "proj", "projconcat", "softbin"
]
COUNT_EMBEDDINGS: tuple[str, ...] = (
    "log1p_mul",
    "log1pzero",
    "anscombe",
    "sqrt",
    "proj",
    "projconcat",
    "softbin",
)


class Projection(nn.Module):
    """``proj``: E[g] + Linear_{1->E}(c) (REF)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.count_embedding = nn.Linear(1, dim)

    def forward(self, genes: Tensor, counts: Tensor) -> Tensor:
        """genes (..., E), counts (..., 1) -> (..., E)."""
        return genes + self.count_embedding(counts)


class ProjectionConcat(nn.Module):
    """``projconcat``: Linear_{2E->E}([E[g]; log1p(c) repeated E times]) (PAPER)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mix = nn.Linear(2 * dim, dim)

    def forward(self, genes: Tensor, counts: Tensor) -> Tensor:
        """genes (..., E), counts (..., 1) -> (..., E)."""
        log_counts = torch.log1p(counts).expand_as(genes)  # (..., E)
        return self.mix(torch.cat([genes, log_counts], dim=-1))  # (..., 2E) -> (..., E)


class SoftBinProjection(nn.Module):
    """``softbin``: E[g] + softmax(MLP(c)) @ bin embeddings (REF, scLDM.CD4 release)."""

    def __init__(self, dim: int, num_bins: int = 10, hidden_dim: int = 64) -> None:
        super().__init__()
        self.mlp_count = nn.Sequential(
            nn.Linear(1, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, num_bins)
        )
        self.bin_embeddings = nn.Parameter(torch.randn(num_bins, dim))

    def forward(self, genes: Tensor, counts: Tensor) -> Tensor:
        """genes (..., E), counts (..., 1) -> (..., E)."""
        weights = torch.softmax(self.mlp_count(counts), dim=-1)  # (..., K)
        return genes + weights @ self.bin_embeddings  # (..., E)


def _scale(kind: str, counts: Tensor) -> Tensor:
    """Multiplicative count transforms of the parameter-free embeddings; counts (..., 1)."""
    if kind == "log1p_mul":
        return torch.log1p(counts)
    if kind == "log1pzero":
        return torch.where(counts == 0, torch.full_like(counts, -1.0), torch.log1p(counts))
    if kind == "anscombe":  # REF form: asinh(sqrt(c + 1))
        return torch.asinh(torch.sqrt(counts + 1.0))
    return torch.sqrt(counts + 1.0)  # sqrt


class InputLayer(nn.Module):
    """Token embedding f(E[g], c) for every (gene, count) pair.

    Args:
        num_genes: vocabulary size V (table has V + 1 rows, row 0 = PAD).
        dim: embedding width E.
        kind: count embedding (see ``COUNT_EMBEDDINGS``).
    """

    def __init__(self, num_genes: int, dim: int, kind: CountEmbedding = "log1p_mul") -> None:
        super().__init__()
        if kind not in COUNT_EMBEDDINGS:
            raise ValueError(f"unknown count_embedding {kind!r}; expected {COUNT_EMBEDDINGS}")
        self.kind = kind
        self.gene_embedding = nn.Embedding(num_genes + 1, dim)
        modules = {"proj": Projection, "projconcat": ProjectionConcat, "softbin": SoftBinProjection}
        self.projection = modules[kind](dim) if kind in modules else None

    def forward(self, gene_ids: Tensor, counts: Tensor) -> Tensor:
        """gene_ids (...) int, counts (...) float -> tokens (..., E)."""
        genes = self.gene_embedding(gene_ids)  # (..., E)
        c = counts.to(genes.dtype).unsqueeze(-1)  # (..., 1)
        if self.projection is not None:
            return self.projection(genes, c)
        return genes * _scale(self.kind, c)

"""Transformer building blocks shared by the VAE and the DiT.

Shape legend:
    B   batch (cells)          L   tokens per item         E   model width
    Lq  query tokens           Lk  key tokens              F   SwiGLU hidden width
    N   positions of a sin-cos table

Parameter names follow the scLDM reference (``ln_1``, ``ln_2``, ``attn``, ``mlp``, ``w1``,
``w2``, ``c_proj``) so its checkpoints map key for key. REF below is that reference
implementation (docs/model.md, 'Tags').
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atlasldm.models.attention import Backend, CrossAttention, SelfAttention


def swiglu_hidden_dim(dim: int, multiple_of: int = 4) -> int:
    """REF hidden width: ``multiple_of * ceil(int(8 * dim / 3) / multiple_of)``."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """SwiGLU MLP: c_proj(silu(w1 x) * w2 x).

    Args:
        dim: input/output width E.
        hidden_dim: hidden width F (default :func:`swiglu_hidden_dim`).
        multiple_of: rounding of the default hidden width.
        bias: bias on the three linears (REF: none).
    """

    def __init__(
        self, dim: int, hidden_dim: int | None = None, multiple_of: int = 4, bias: bool = False
    ) -> None:
        super().__init__()
        hidden = hidden_dim or swiglu_hidden_dim(dim, multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """(..., E) -> (..., E)."""
        return self.c_proj(F.silu(self.w1(x)) * self.w2(x))  # (..., F) -> (..., E)


class Block(nn.Module):
    """Pre-LN self-attention block: x + Attn(LN x), then x + SwiGLU(LN x).

    Args:
        dim: width E.
        num_heads: attention heads.
        bias: bias on attention projections.
        dropout: residual dropout.
        multiple_of: SwiGLU hidden rounding.
        norm_eps: LayerNorm epsilon (REF 1e-8).
        elementwise_affine: LayerNorm affine parameters.
        mlp_bias: bias on the SwiGLU linears.
        backend: attention backend.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        bias: bool = False,
        dropout: float = 0.0,
        multiple_of: int = 4,
        norm_eps: float = 1e-8,
        elementwise_affine: bool = True,
        mlp_bias: bool = False,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=elementwise_affine)
        self.ln_2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=elementwise_affine)
        self.attn = SelfAttention(dim, num_heads, bias=bias, dropout=dropout, backend=backend)
        self.mlp = SwiGLU(dim, multiple_of=multiple_of, bias=mlp_bias)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """(B, L, E) -> (B, L, E); ``key_padding_mask`` (B, L) True = real token."""
        x = x + self.attn(self.ln_1(x), key_padding_mask)
        return x + self.mlp(self.ln_2(x))


class CrossAttentionBlock(nn.Module):
    """Pre-LN cross-attention block: F = q + CrossAttn(LN_q q, LN kv); F + SwiGLU(LN F).

    With ``num_inducing_points > 0`` the block owns learned queries I (M, E) ~ N(0, 1) (the MCAB
    of the encoder); otherwise queries are passed in (the decoder's gene queries).

    Args:
        dim: width E (queries and keys).
        num_heads: attention heads.
        num_inducing_points: M learned queries, 0 for none.
        bias: bias on attention projections.
        dropout: residual dropout.
        multiple_of: SwiGLU hidden rounding.
        norm_eps: LayerNorm epsilon.
        backend: attention backend.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_inducing_points: int = 0,
        bias: bool = False,
        dropout: float = 0.0,
        multiple_of: int = 4,
        norm_eps: float = 1e-8,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.inducing_points = None
        if num_inducing_points > 0:
            self.inducing_points = nn.Parameter(torch.randn(num_inducing_points, dim))
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps)  # keys/values
        self.ln_1q = nn.LayerNorm(dim, eps=norm_eps)  # queries
        self.attn = CrossAttention(dim, num_heads, bias=bias, dropout=dropout, backend=backend)
        self.ln_2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, multiple_of=multiple_of)

    def queries(self, q: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return the residual queries (B|1, Lq, E) and their projection (B|1, H, Lq, Dh).

        Cell-independent when q is shared (leading dim 1): compute once, reuse for every cell.
        """
        if q is None:
            if self.inducing_points is None:
                raise ValueError("queries required: block has no inducing points")
            q = self.inducing_points.unsqueeze(0)  # (1, M, E)
        return q, self.attn.project_q(self.ln_1q(q))

    def finish(self, q: Tensor, attn_out: Tensor) -> Tensor:
        """Residual + MLP: q (B|1, Lq, E) + attn_out (B, Lq, E) -> (B, Lq, E)."""
        x = q + attn_out
        return x + self.mlp(self.ln_2(x))

    def forward(
        self,
        kv: Tensor,
        q: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        *,
        cu_seqlens_k: Tensor | None = None,
        max_seqlen_k: int | None = None,
    ) -> Tensor:
        """Pool kv (B, Lk, E) or packed (Tk, E) into the queries -> (B, Lq, E).

        Args:
            kv: key/value tokens, padded (B, Lk, E) or packed (Tk, E) with ``cu_seqlens_k``.
            q: (B|1, Lq, E) queries; None uses the inducing points.
            key_padding_mask: (B, Lk) bool True = real (padded layout).
            cu_seqlens_k: (B+1,) int32 (packed layout).
            max_seqlen_k: longest key sequence (packed layout).
        """
        q, qh = self.queries(q)
        k, v = self.attn.project_kv(self.ln_1(kv))  # (B, Lk, H, Dh) or (Tk, H, Dh)
        if cu_seqlens_k is None:
            out = self.attn.attend(qh, k, v, key_padding_mask)  # (B, Lq, E)
        else:
            if max_seqlen_k is None:
                max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
            out = self.attn.attend_packed(qh, k, v, cu_seqlens_k, max_seqlen_k)
        return self.finish(q, out)


def sincos_embedding_1d(num_positions: int, dim: int) -> Tensor:
    """Fixed 1-D sin-cos table (REF ``get_1d_sincos_pos_embed``: [sin | cos] halves).

    Args:
        num_positions: N positions 0..N-1.
        dim: even embedding width.

    Returns:
        (N, dim) float32.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = np.arange(num_positions, dtype=np.float64)[:, None] * omega[None, :]  # (N, dim/2)
    emb = np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (N, dim)
    return torch.from_numpy(emb).float()


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep features (REF/DiT: [cos | sin]); t (B,) -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (dim/2,)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*(dim/2))
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x * (1 + scale) + shift (broadcasting)."""
    return x * (1 + scale) + shift

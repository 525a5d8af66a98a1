"""Attention kernels and the self/cross attention modules built on them.

Shape legend:
    B   batch (cells)              H   heads            Dh  head dim (E / H)
    Lq  query tokens per item      Lk  key tokens per item
    E   model width                Ekv key/value input width
    Tq  packed query tokens        Tk  packed key tokens (sum of per-cell lengths)

One dispatch point, three backends:
    ``sdpa``       ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask;
    ``flash``      FlashAttention-2 (``flash_attn``), CUDA + fp16/bf16 only, import guarded;
    ``reference``  explicit softmax(Q K^T / sqrt(Dh)) V in fp32 with masking (tests, debugging).
``auto`` picks ``flash`` for packed (varlen) inputs on CUDA when ``flash_attn`` is importable and
the inputs are half precision, else ``sdpa``. Packed keys pooled by shared queries (the MCAB)
skip padding on the CPU: :func:`shared_query_attention` runs one SDPA per sequence on views of
the packed keys (``reference`` still pads, as the oracle). Masks use True = real key. A row
whose keys are all masked is undefined (NaN, or 0 from CPU ``sdpa``); the data loader's
``min_genes`` filter prevents it. REF in docstrings is the scLDM reference implementation
(docs/model.md, 'Tags'), whose parameter names we keep.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # optional extra: pip install atlasldm[flash]
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_func = None
    flash_attn_varlen_func = None

Backend = Literal["auto", "sdpa", "flash", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flash", "reference")


def flash_available(t: Tensor | None = None) -> bool:
    """Whether the flash backend can run (on ``t``'s device and dtype when given)."""
    if flash_attn_varlen_func is None or not torch.cuda.is_available():
        return False
    return t is None or (t.is_cuda and t.dtype in (torch.float16, torch.bfloat16))


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend == "flash" and flash_attn_varlen_func is None:
        raise RuntimeError("backend='flash' needs the flash_attn package (extra 'flash')")


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
) -> Tensor:
    """Explicit attention in fp32: softmax(q k^T / sqrt(Dh)) v, masked keys get weight 0.

    Args:
        q: (B, H, Lq, Dh) queries.
        k: (B, H, Lk, Dh) keys.
        v: (B, H, Lk, Dh) values.
        key_padding_mask: optional (B, Lk) bool, True = real key.

    Returns:
        (B, H, Lq, Dh) in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, Lk)
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # (B, H, Lq, Lk)
    return torch.matmul(weights, v.float()).to(q.dtype)  # (B, H, Lq, Dh)


def _flash_padded(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """Flash path for the padded layout: dense kernel, or unpad the keys and go varlen."""
    B, H, Lq, Dh = q.shape
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    qt, kt, vt = (t.transpose(1, 2).to(dtype) for t in (q, k, v))  # (B, L, H, Dh)
    if key_padding_mask is None:
        return flash_attn_func(qt, kt, vt).transpose(1, 2).to(q.dtype)  # (B, H, Lq, Dh)
    mask = key_padding_mask.to(torch.bool)
    lens_k = mask.sum(dim=1, dtype=torch.int32)  # (B,)
    cu_k = F.pad(torch.cumsum(lens_k, 0, dtype=torch.int32), (1, 0))  # (B+1,)
    cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * Lq  # (B+1,)
    out = flash_attn_varlen_func(
        qt.reshape(B * Lq, H, Dh), kt[mask], vt[mask], cu_q, cu_k, Lq, int(lens_k.max())
    )  # (B*Lq, H, Dh)
    return out.view(B, Lq, H, Dh).transpose(1, 2).to(q.dtype)  # (B, H, Lq, Dh)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Multi-head attention on the padded layout.

    Args:
        q: (B, H, Lq, Dh) queries (B may be 1 and broadcast against k/v only with ``sdpa``).
        k: (B, H, Lk, Dh) keys.
        v: (B, H, Lk, Dh) values.
        key_padding_mask: optional (B, Lk) bool, True = real key; masked keys get weight 0.
        backend: ``auto`` (= ``sdpa`` here), ``sdpa``, ``flash`` or ``reference``.

    Returns:
        (B, H, Lq, Dh).
    """
    _check_backend(backend)
    if backend == "reference":
        return reference_attention(q, k, v, key_padding_mask)
    if backend == "flash":
        return _flash_padded(q, k, v, key_padding_mask)
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, Lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, Dh)


def seq_index(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """Map packed positions to (sequence, position-in-sequence).

    Args:
        cu_seqlens: (N+1,) int cumulative lengths, starting at 0.
        total: number of packed tokens (== cu_seqlens[-1]).

    Returns:
        seq (total,) int64 and pos (total,) int64.
    """
    cu = cu_seqlens.to(torch.int64)
    idx = torch.arange(total, device=cu.device)  # (T,)
    seq = torch.searchsorted(cu[1:], idx, right=True)  # (T,)
    return seq, idx - cu[seq]


def _check_rows(cu: Tensor, lengths: Tensor, total: int, max_len: int) -> None:
    """Raise where a flat row would land silently in another sequence's slots."""
    end, longest = torch.stack((cu[-1], lengths.max() if lengths.numel() else cu[0])).tolist()
    if end != total:  # one host read for both checks
        raise ValueError(f"cu_seqlens ends at {end}, expected {total} packed rows")
    if longest > max_len:
        raise ValueError(f"max_len {max_len} is shorter than the longest sequence ({longest})")


def padded_rows(cu_seqlens: Tensor, total: int, max_len: int) -> tuple[Tensor, Tensor]:
    """Where packed rows go in the padded layout: one flat row index per token, and the mask.

    Compute once per ``cu_seqlens`` and reuse for every tensor padded or unpadded with it.

    Args:
        cu_seqlens: (N+1,) int cumulative lengths, starting at 0.
        total: number of packed tokens (== cu_seqlens[-1]).
        max_len: padded length L (>= the longest sequence).

    Returns:
        rows (total,) int64, token i's row ``seq * L + pos`` in an (N * L) layout, and the
        (N, L) bool mask, True = real token.
    """
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]  # (N,)
    if not torch.compiler.is_compiling():  # eager guard; a graph would break on the host read
        _check_rows(cu, lengths, total, max_len)
    seq = torch.repeat_interleave(
        torch.arange(lengths.shape[0], device=cu.device), lengths, output_size=total
    )  # (T,)
    rows = torch.arange(total, device=cu.device) + (seq * max_len - cu[seq])  # (T,)
    mask = torch.arange(max_len, device=cu.device) < lengths[:, None]  # (N, L)
    return rows, mask


def scatter_rows(x: Tensor, rows: Tensor, mask: Tensor) -> Tensor:
    """Packed x (T, ...) into zeros (N, L, ...) at :func:`padded_rows`' rows (differentiable)."""
    n, max_len = mask.shape
    out = x.new_zeros((n * max_len, *x.shape[1:]))  # (N*L, ...)
    return out.index_copy_(0, rows, x).view(n, max_len, *x.shape[1:])  # (N, L, ...)


def pad_packed(x: Tensor, cu_seqlens: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    """Scatter packed rows (T, ...) into (N, max_len, ...) zeros; also return the (N, L) mask."""
    rows, mask = padded_rows(cu_seqlens, x.shape[0], max_len)
    return scatter_rows(x, rows, mask), mask


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    backend: Backend = "auto",
) -> Tensor:
    """Attention on packed variable-length sequences (no cross-sequence attention).

    ``flash`` calls ``flash_attn_varlen_func``; the other backends pad through ``cu_seqlens``
    (one flat scatter per tensor, rows and masks computed once), run masked attention, unpad.

    Args:
        q: (Tq, H, Dh) packed queries.
        k: (Tk, H, Dh) packed keys.
        v: (Tk, H, Dh) packed values.
        cu_seqlens_q: (N+1,) int32 cumulative query lengths.
        cu_seqlens_k: (N+1,) int32 cumulative key lengths.
        max_seqlen_q: longest query sequence (python int).
        max_seqlen_k: longest key sequence (python int).
        backend: ``auto``, ``sdpa``, ``flash`` or ``reference``.

    Returns:
        (Tq, H, Dh).
    """
    _check_backend(backend)
    if backend == "auto":
        backend = "flash" if flash_available(q) else "sdpa"
    if backend == "flash":
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        cu_q, cu_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
        q16, k16, v16 = q.to(dtype), k.to(dtype), v.to(dtype)
        out = flash_attn_varlen_func(q16, k16, v16, cu_q, cu_k, max_seqlen_q, max_seqlen_k)
        return out.to(q.dtype)  # (Tq, H, Dh)
    rows_q, mask_q = padded_rows(cu_seqlens_q, q.shape[0], int(max_seqlen_q))
    rows_k, mask_k = padded_rows(cu_seqlens_k, k.shape[0], int(max_seqlen_k))
    qp = scatter_rows(q, rows_q, mask_q).transpose(1, 2)  # (N, H, Lq, Dh)
    kp, vp = (scatter_rows(t, rows_k, mask_k).transpose(1, 2) for t in (k, v))  # (N, H, Lk, Dh)
    out = attention(qp, kp, vp, key_padding_mask=mask_k, backend=backend)  # (N, H, Lq, Dh)
    return out.transpose(1, 2).flatten(0, 1).index_select(0, rows_q)  # (Tq, H, Dh)


def _per_sequence(q: Tensor, k: Tensor, backend: str) -> bool:
    """Whether :func:`shared_query_attention` loops over sequences (eager CPU ``auto``/``sdpa``).

    On the CPU, N unpadded SDPA calls beat a scatter into zeros plus one masked call over
    N x longest keys; on accelerators, N kernel launches and the host sync on the lengths
    would cost more than the padding saves. Under ``torch.compile`` the padded path keeps one
    graph: a loop over the lengths would specialise the graph on every batch's lengths.
    """
    on_cpu = q.device.type == "cpu" and k.device.type == "cpu"
    return backend in ("auto", "sdpa") and on_cpu and not torch.compiler.is_compiling()


def shared_query_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_k: Tensor, max_seqlen_k: int, backend: Backend
) -> Tensor:
    """Every packed key sequence attends from the same queries (the MCAB inducing points).

    CPU ``auto``/``sdpa``: one unmasked SDPA per sequence on views of the packed keys, no
    padding, no scatter and no mask; elsewhere (``reference``, ``flash``, CUDA) the padded or
    flash :func:`varlen_attention` with the queries repeated per sequence.

    Args:
        q: (H, Lq, Dh) queries shared by every sequence.
        k: (Tk, H, Dh) packed keys.
        v: (Tk, H, Dh) packed values.
        cu_seqlens_k: (N+1,) int cumulative key lengths.
        max_seqlen_k: longest key sequence (python int).
        backend: ``auto``, ``sdpa``, ``flash`` or ``reference``.

    Returns:
        (N, Lq, H, Dh).
    """
    _check_backend(backend)
    n, (H, Lq, Dh) = cu_seqlens_k.shape[0] - 1, q.shape
    if not _per_sequence(q, k, backend):
        qp = q.expand(n, H, Lq, Dh).transpose(1, 2).reshape(n * Lq, H, Dh)  # (N*Lq, H, Dh)
        cu_q = torch.arange(n + 1, device=q.device, dtype=torch.int32) * Lq  # (N+1,)
        out = varlen_attention(qp, k, v, cu_q, cu_seqlens_k, Lq, max_seqlen_k, backend=backend)
        return out.view(n, Lq, H, Dh)
    if n == 0:
        return q.new_empty(0, Lq, H, Dh)
    lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    q4 = q.unsqueeze(0)  # (1, H, Lq, Dh)
    # split token-major, then view each cell head-major: the backward concatenates the cells'
    # gradients along the packed axis into a contiguous (Tk, H, Dh)
    outs = [
        F.scaled_dot_product_attention(q4, kc.transpose(0, 1)[None], vc.transpose(0, 1)[None])
        for kc, vc in zip(k.split(lengths), v.split(lengths), strict=True)
    ]  # N x (1, H, Lq, Dh)
    return torch.cat(outs).transpose(1, 2)  # (N, Lq, H, Dh)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection (REF names: c_attn, c_proj).

    Args:
        dim: model width E.
        num_heads: heads H (E must be divisible by H).
        bias: bias on the projections.
        dropout: residual dropout on the output.
        backend: attention backend.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        bias: bool = False,
        dropout: float = 0.0,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.backend = dim, num_heads, backend
        self.c_attn = nn.Linear(dim, 3 * dim, bias=bias)
        self.c_proj = nn.Linear(dim, dim, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Attend x (B, L, E) to itself; ``key_padding_mask`` (B, L) True = real. -> (B, L, E)."""
        B, L, E = x.shape
        H = self.num_heads
        qkv = self.c_attn(x).view(B, L, 3, H, E // H)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, Dh)
        y = attention(q, k, v, key_padding_mask=key_padding_mask, backend=self.backend)
        y = y.transpose(1, 2).reshape(B, L, E)  # (B, L, E)
        return self.resid_dropout(self.c_proj(y))


class CrossAttention(nn.Module):
    """Multi-head cross-attention (REF names: c_attn_q for Q, c_attn for KV, c_proj).

    Queries may be shared across the batch (leading dim 1), which lets callers hoist the
    cell-independent query projection (:meth:`project_q`) out of per-cell work.

    Args:
        dim: query/model width E.
        num_heads: heads H.
        kv_dim: key/value input width (default E).
        bias: bias on the projections.
        dropout: residual dropout on the output.
        backend: attention backend.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kv_dim: int | None = None,
        bias: bool = False,
        dropout: float = 0.0,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.backend = dim, num_heads, backend
        self.c_attn = nn.Linear(kv_dim or dim, 2 * dim, bias=bias)
        self.c_attn_q = nn.Linear(dim, dim, bias=bias)
        self.c_proj = nn.Linear(dim, dim, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def project_q(self, q: Tensor) -> Tensor:
        """Query projection (..., Lq, E) -> (..., H, Lq, Dh)."""
        *lead, Lq, E = q.shape
        H = self.num_heads
        return self.c_attn_q(q).view(*lead, Lq, H, E // H).transpose(-3, -2)  # (..., H, Lq, Dh)

    def project_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """Key/value projection (..., Lk, Ekv) -> 2 x (..., Lk, H, Dh) (token-major)."""
        H, E = self.num_heads, self.dim
        k, v = self.c_attn(kv).view(*kv.shape[:-1], 2, H, E // H).unbind(-3)  # (..., Lk, H, Dh)
        return k, v

    def attend(
        self, qh: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """Padded attention from projected parts: qh (B|1, H, Lq, Dh), k/v (B, Lk, H, Dh)."""
        B, H = k.shape[0], self.num_heads
        qh = qh.expand(B, *qh.shape[1:])  # (B, H, Lq, Dh), a view when shared
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H, Lk, Dh)
        y = attention(qh, k, v, key_padding_mask=key_padding_mask, backend=self.backend)
        y = y.transpose(1, 2).reshape(B, qh.shape[2], H * qh.shape[3])  # (B, Lq, E)
        return self.resid_dropout(self.c_proj(y))

    def attend_packed(
        self, qh: Tensor, k: Tensor, v: Tensor, cu_seqlens_k: Tensor, max_seqlen_k: int
    ) -> Tensor:
        """Varlen attention: qh (B|1, H, Lq, Dh), packed k/v (Tk, H, Dh) -> (B, Lq, E).

        Shared queries (leading dim 1) take :func:`shared_query_attention`, unpadded on the CPU.
        """
        B = cu_seqlens_k.shape[0] - 1
        _, H, Lq, Dh = qh.shape
        if qh.shape[0] == 1:
            y = shared_query_attention(qh[0], k, v, cu_seqlens_k, max_seqlen_k, self.backend)
            return self.resid_dropout(self.c_proj(y.reshape(B, Lq, H * Dh)))  # (B, Lq, E)
        qp = qh.transpose(1, 2).reshape(B * Lq, H, Dh)  # (B*Lq, H, Dh)
        cu_q = torch.arange(B + 1, device=qh.device, dtype=torch.int32) * Lq  # (B+1,)
        y = varlen_attention(
            qp, k, v, cu_q, cu_seqlens_k, Lq, max_seqlen_k, backend=self.backend
        )  # (B*Lq, H, Dh)
        return self.resid_dropout(self.c_proj(y.reshape(B, Lq, H * Dh)))  # (B, Lq, E)

    def forward(
        self,
        q: Tensor,
        kv: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        cu_seqlens_k: Tensor | None = None,
        max_seqlen_k: int | None = None,
    ) -> Tensor:
        """Cross-attend queries to keys/values.

        Args:
            q: (B, Lq, E) queries, or (1, Lq, E) shared by every item.
            kv: (B, Lk, Ekv) padded, or (Tk, Ekv) packed when ``cu_seqlens_k`` is given.
            key_padding_mask: (B, Lk) bool, True = real key (padded layout only).
            cu_seqlens_k: (B+1,) int32 cumulative key lengths (packed layout).
            max_seqlen_k: longest key sequence (packed layout; computed when omitted).

        Returns:
            (B, Lq, E).
        """
        qh = self.project_q(q)  # (B|1, H, Lq, Dh)
        k, v = self.project_kv(kv)  # (B, Lk, H, Dh) or (Tk, H, Dh)
        if cu_seqlens_k is None:
            return self.attend(qh, k, v, key_padding_mask)
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
        return self.attend_packed(qh, k, v, cu_seqlens_k, max_seqlen_k)

"""CellBatch: the VAE's input, packed (varlen) or padded, built on the tensors' device.

Shape legend:
    B   cells                  T   packed tokens (expressed genes of all cells)
    S   padded length          G   decoded genes (or a chunk of them)
    A   condition attributes   V   vocabulary size (tokens 1..V, 0 = PAD)

Packed: ``gene_ids`` (T,), ``counts`` (T,), ``cu_seqlens`` (B+1,) int32.
Padded: ``gene_ids`` (B, S), ``counts`` (B, S), ``mask`` (B, S) bool True = real gene.
Dense likelihood targets are scattered chunk by chunk on the batch's device, never as a full
(B, V) matrix on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from atlasldm.models.attention import pad_packed, seq_index


def _cu_from_lengths(lengths: Tensor) -> Tensor:
    return F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)  # (B+1,)


@dataclass
class CellBatch:
    """Cells for the VAE. Build with :meth:`from_packed`; :meth:`padded` gives the padded form.

    Attributes:
        gene_ids: int64 tokens, (T,) packed or (B, S) padded; 0 = PAD.
        counts: float32 counts, same shape as ``gene_ids``.
        library_size: (B,) float32 ℓ.
        cu_seqlens: (B+1,) int32 (packed form) else None.
        mask: (B, S) bool True = real gene (padded form) else None.
        max_seqlen: longest cell (python int).
        labels: optional (B, A) int64 condition codes.
        stats: counters from construction (``dropped_unknown``).
    """

    gene_ids: Tensor
    counts: Tensor
    library_size: Tensor
    cu_seqlens: Tensor | None = None
    mask: Tensor | None = None
    max_seqlen: int = 0
    labels: Tensor | None = None
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def is_packed(self) -> bool:
        """True for the packed (varlen) form."""
        return self.cu_seqlens is not None

    @property
    def num_cells(self) -> int:
        """B."""
        return int(self.library_size.shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.gene_ids.device

    @classmethod
    def from_packed(
        cls,
        gene_ids: Tensor,
        counts: Tensor,
        cu_seqlens: Tensor,
        library_size: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        num_genes: int | None = None,
    ) -> CellBatch:
        """Wrap packed CSR tensors (e.g. ``CsrBatch`` fields moved to the device).

        Args:
            gene_ids: (T,) tokens 1..V.
            counts: (T,) counts.
            cu_seqlens: (B+1,) cumulative lengths.
            library_size: (B,) ℓ; default: the sum of each cell's counts.
            labels: optional (B, A) condition codes.
            num_genes: V; tokens outside 1..V are dropped and counted (OURS).

        Genes per cell are capped (``max_genes``) by the loader, before a batch gets here
        (docs/contracts.md §2.1).
        """
        gene_ids, counts = gene_ids.long(), counts.float()
        cu = cu_seqlens.to(device=gene_ids.device, dtype=torch.int64)
        seq, _ = seq_index(cu, gene_ids.shape[0])  # (T,)
        n = cu.shape[0] - 1
        if library_size is None:
            library_size = torch.zeros(n, device=counts.device).index_add_(0, seq, counts)
        keep = torch.ones_like(gene_ids, dtype=torch.bool)  # (T,)
        stats = {"dropped_unknown": 0}
        if num_genes is not None:
            keep = (gene_ids >= 1) & (gene_ids <= num_genes)
            stats["dropped_unknown"] = int((~keep).sum())
        if not bool(keep.all()):
            lengths = torch.zeros(n, dtype=torch.int64, device=cu.device)
            lengths.index_add_(0, seq[keep], torch.ones_like(seq[keep]))
            gene_ids, counts, cu = gene_ids[keep], counts[keep], _cu_from_lengths(lengths)
        lengths = cu[1:] - cu[:-1]
        return cls(
            gene_ids=gene_ids,
            counts=counts,
            library_size=library_size.float(),
            cu_seqlens=cu.to(torch.int32),
            max_seqlen=int(lengths.max()) if n else 0,
            labels=labels,
            stats=stats,
        )

    def padded(self, max_len: int | None = None) -> CellBatch:
        """The padded form (B, S) with S = ``max_len`` or the longest cell."""
        if not self.is_packed:
            return self
        length = max(max_len or 0, self.max_seqlen)
        ids, mask = pad_packed(self.gene_ids, self.cu_seqlens, length)  # (B, S)
        counts, _ = pad_packed(self.counts, self.cu_seqlens, length)  # (B, S)
        return replace(self, gene_ids=ids, counts=counts, mask=mask, cu_seqlens=None)

    def packed(self) -> CellBatch:
        """The packed form (T,) with ``cu_seqlens``."""
        if self.is_packed:
            return self
        cu = _cu_from_lengths(self.mask.sum(dim=1))  # (B+1,)
        ids, counts = self.gene_ids[self.mask], self.counts[self.mask]  # (T,)
        return replace(self, gene_ids=ids, counts=counts, cu_seqlens=cu, mask=None)

    def to(self, device: torch.device | str) -> CellBatch:
        """Move every tensor to ``device``."""

        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return replace(
            self,
            gene_ids=mv(self.gene_ids),
            counts=mv(self.counts),
            library_size=mv(self.library_size),
            cu_seqlens=mv(self.cu_seqlens),
            mask=mv(self.mask),
            labels=mv(self.labels),
        )

    def _rows_tokens_counts(self) -> tuple[Tensor, Tensor, Tensor]:
        """Row index, token and count of every real entry, each (T,)."""
        if self.is_packed:
            seq, _ = seq_index(self.cu_seqlens, self.gene_ids.shape[0])
            return seq, self.gene_ids, self.counts
        rows = torch.nonzero(self.mask, as_tuple=True)[0]  # (T,)
        return rows, self.gene_ids[self.mask], self.counts[self.mask]

    def dense_target_chunk(self, gene_start: int, gene_end: int) -> Tensor:
        """Counts of tokens ``gene_start .. gene_end - 1`` as (B, gene_end - gene_start)."""
        rows, tok, cnt = self._rows_tokens_counts()
        col = tok - gene_start  # (T,)
        sel = (col >= 0) & (col < gene_end - gene_start)
        out = torch.zeros(self.num_cells, gene_end - gene_start, device=self.device)
        out[rows[sel], col[sel]] = cnt[sel]
        return out

    def dense_target(self, gene_ids: Tensor) -> Tensor:
        """Counts of an arbitrary gene list (G,) (distinct tokens) as (B, G)."""
        rows, tok, cnt = self._rows_tokens_counts()
        size = int(max(int(gene_ids.max()), int(tok.max()) if tok.numel() else 0)) + 1
        lookup = torch.full((size,), -1, dtype=torch.int64, device=self.device)  # (V+1,)
        lookup[gene_ids.long()] = torch.arange(gene_ids.shape[0], device=self.device)
        col = lookup[tok]  # (T,)
        sel = col >= 0
        out = torch.zeros(self.num_cells, gene_ids.shape[0], device=self.device)
        out[rows[sel], col[sel]] = cnt[sel]
        return out

    def _dense_rows(self, size: int, fill: Tensor | None = None) -> Tensor:
        """(B, size) table over tokens 0..size-1: counts, or ``fill`` where given, per cell."""
        rows, tok, cnt = self._rows_tokens_counts()
        out = torch.zeros(self.num_cells, size, device=self.device, dtype=cnt.dtype)
        out[rows, tok] = cnt if fill is None else fill.expand_as(cnt).to(cnt.dtype)
        return out

    def dense_target_rows(self, gene_ids: Tensor) -> Tensor:
        """Counts of per-cell gene lists (B, c) (PAD-free tokens; repeats allowed) as (B, c)."""
        _, tok, _ = self._rows_tokens_counts()
        size = int(max(int(gene_ids.max()), int(tok.max()) if tok.numel() else 0)) + 1
        return self._dense_rows(size).gather(1, gene_ids.long())

    def membership(self, gene_ids: Tensor) -> Tensor:
        """(B, G) bool: whether each cell lists each gene of ``gene_ids`` (G,) among its tokens."""
        _, tok, _ = self._rows_tokens_counts()
        size = int(max(int(gene_ids.max()), int(tok.max()) if tok.numel() else 0)) + 1
        listed = self._dense_rows(size, torch.ones((), device=self.device))  # (B, size)
        return listed[:, gene_ids.long()] > 0

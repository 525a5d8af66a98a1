"""CsrBatch: one micro-batch of cells as CSR host tensors (docs/contracts.md §2).

Shape legend: B cells, nnz expressed genes in the batch, A condition attributes, S padded length.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass
class CsrBatch:
    """Sparse batch: cell i's genes are `gene_ids[cu_seqlens[i]:cu_seqlens[i+1]]`."""

    gene_ids: torch.Tensor  # int32 (nnz,), vocabulary tokens 1..V
    counts: torch.Tensor  # float32 (nnz,), raw counts (> 0)
    cu_seqlens: torch.Tensor  # int32 (B+1,), cumulative gene counts, starts at 0
    library_size: torch.Tensor  # float32 (B,), sum over ALL genes of the cell
    conditions: torch.Tensor  # int64 (B, A), label codes in `condition_names` order
    condition_names: tuple[str, ...]  # attribute names, A of them
    soma_joinid: torch.Tensor  # int64 (B,), joinid in the experiment the stream reads

    @classmethod
    def from_numpy(
        cls,
        gene_ids: np.ndarray,
        counts: np.ndarray,
        indptr: np.ndarray,
        library_size: np.ndarray,
        conditions: np.ndarray,
        condition_names: tuple[str, ...],
        soma_joinid: np.ndarray,
    ) -> CsrBatch:
        """Wrap numpy arrays (shared memory where dtypes already match) into a CsrBatch."""
        indptr = np.asarray(indptr)
        cu = (indptr - indptr[0]).astype(np.int32)
        return cls(
            gene_ids=torch.from_numpy(np.ascontiguousarray(gene_ids, dtype=np.int32)),
            counts=torch.from_numpy(np.ascontiguousarray(counts, dtype=np.float32)),
            cu_seqlens=torch.from_numpy(cu),
            library_size=torch.from_numpy(np.ascontiguousarray(library_size, dtype=np.float32)),
            conditions=torch.from_numpy(
                # explicit A: reshape(B, -1) is ambiguous when B = 0 (an empty tail batch)
                np.ascontiguousarray(conditions, dtype=np.int64).reshape(
                    len(cu) - 1, len(condition_names)
                )
            ),
            condition_names=tuple(condition_names),
            soma_joinid=torch.from_numpy(np.ascontiguousarray(soma_joinid, dtype=np.int64)),
        )

    @property
    def num_cells(self) -> int:
        """B, the number of cells."""
        return int(self.cu_seqlens.numel()) - 1

    @property
    def num_tokens(self) -> int:
        """nnz, the number of (cell, gene) entries."""
        return int(self.gene_ids.numel())

    def padded(self, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (gene_ids int64 (B,S), counts float32 (B,S), mask bool (B,S)); PAD is 0.

        S is `max_len` or the longest cell. Raises ValueError when a cell is longer than
        `max_len` (cut cells with the stream's `max_genes` instead of silently here).
        """
        cu = self.cu_seqlens.long()
        lengths = cu[1:] - cu[:-1]  # (B,)
        longest = int(lengths.max()) if self.num_cells else 0
        width = longest if max_len is None else int(max_len)
        if longest > width:
            raise ValueError(
                f"a cell has {longest} genes but max_len={width}; raise max_len or lower the "
                "stream's max_genes"
            )
        device = self.gene_ids.device
        rows = torch.repeat_interleave(torch.arange(self.num_cells, device=device), lengths)
        cols = torch.arange(self.num_tokens, device=device) - cu[:-1].repeat_interleave(lengths)
        gene_ids = torch.zeros(self.num_cells, width, dtype=torch.int64, device=device)
        counts = torch.zeros(self.num_cells, width, dtype=self.counts.dtype, device=device)
        mask = torch.zeros(self.num_cells, width, dtype=torch.bool, device=device)
        gene_ids[rows, cols] = self.gene_ids.long()
        counts[rows, cols] = self.counts
        mask[rows, cols] = True
        return gene_ids, counts, mask

    def _map(self, fn) -> CsrBatch:
        names = ("gene_ids", "counts", "cu_seqlens", "library_size", "conditions", "soma_joinid")
        return replace(self, **{n: fn(getattr(self, n)) for n in names})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CsrBatch:
        """Return a copy on `device` (non_blocking pays off from pinned memory)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> CsrBatch:
        """Return a copy in page-locked host memory (used by DataLoader(pin_memory=True))."""
        return self._map(lambda t: t.pin_memory())

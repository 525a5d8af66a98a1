"""CellBatch: packed <-> padded, dense target chunks, unknown-gene drop."""

from __future__ import annotations

import torch

from atlasldm.models.batch import CellBatch


def _batch():
    gene_ids = torch.tensor([3, 1, 7, 2, 9, 4, 5, 8, 6], dtype=torch.int32)
    counts = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    return CellBatch.from_packed(gene_ids, counts, cu)


def _dense(batch, V):
    out = torch.zeros(batch.num_cells, V + 1)
    cu = batch.cu_seqlens.tolist()
    for i in range(batch.num_cells):
        out[i, batch.gene_ids[cu[i] : cu[i + 1]]] = batch.counts[cu[i] : cu[i + 1]]
    return out


def test_packed_padded_roundtrip():
    b = _batch()
    assert b.is_packed and b.num_cells == 3 and b.max_seqlen == 5
    torch.testing.assert_close(b.library_size, torch.tensor([6.0, 4.0, 35.0]))
    p = b.padded(max_len=7)
    assert p.gene_ids.shape == (3, 7) and p.mask.sum().item() == 9
    assert bool((p.gene_ids[~p.mask] == 0).all()) and bool((p.counts[~p.mask] == 0).all())
    back = p.packed()
    assert torch.equal(back.gene_ids, b.gene_ids) and torch.equal(back.cu_seqlens, b.cu_seqlens)
    # The padded view's real entries, packed again, give the same batch.
    rebuilt = CellBatch.from_packed(p.gene_ids[p.mask], p.counts[p.mask], back.cu_seqlens)
    assert torch.equal(rebuilt.padded(max_len=7).mask, p.mask)
    assert torch.equal(rebuilt.counts, b.counts) and rebuilt.max_seqlen == b.max_seqlen
    torch.testing.assert_close(rebuilt.library_size, b.library_size)


def test_dense_target_chunks_and_lists():
    b = _batch()
    dense = _dense(b, 9)
    for src in (b, b.padded(6)):
        for s in range(1, 10, 4):
            torch.testing.assert_close(
                src.dense_target_chunk(s, min(s + 4, 10)), dense[:, s : s + 4]
            )
        ids = torch.tensor([9, 2, 5, 1])
        torch.testing.assert_close(src.dense_target(ids), dense[:, ids])


def test_unknown_genes_dropped_and_counted():
    gene_ids = torch.tensor([1, 12, 2, 0, 3])
    cu = torch.tensor([0, 2, 5])
    b = CellBatch.from_packed(gene_ids, torch.ones(5), cu, num_genes=10)
    assert b.stats["dropped_unknown"] == 2
    assert b.gene_ids.tolist() == [1, 2, 3] and b.cu_seqlens.tolist() == [0, 1, 3]
    torch.testing.assert_close(b.library_size, torch.tensor([2.0, 3.0]))  # ℓ given by the input

"""Direct mode over an h5ad file: the stream reads an AnnData file's rows in place.

`data.mode=direct` with `data.source=cells.h5ad` streams the file without an ingest: joinids are
row positions, genes map to tokens by the var `feature_id` column (else the var index) against
`vocab_path`, and the counts are `layers/<data.layer>` when the file has that layer, else `X`.
X must be a CSR matrix. Uncompressed files are read by file position (data/h5ad_x.py), the
fastest format this stream reads after a training copy's row store; compressed files work too,
through h5py, and the source says once how much faster an uncompressed copy is.

`obs_filter` here is a pandas query over obs columns (`cell_type == "B cell"`), the counterpart
of a SOMA value filter. Selection, split and label codes are those of a SOMA direct source
(`fold_obs`), so the same query over the same cells gives the same selection and split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa

from atlasldm.data.config import DataConfig
from atlasldm.data.csr import Csr, csr_from_sorted_coo
from atlasldm.data.h5ad_x import H5adCsr
from atlasldm.data.obs_select import ObsFold, fold_obs
from atlasldm.data.piece import Piece, direct_keep, direct_piece, source_tokens
from atlasldm.data.validate import IngestError
from atlasldm.data.vocab import GeneVocab, load_labels

log = logging.getLogger(__name__)

OBS_BLOCK = 1 << 20  # cells per obs table handed to the selection


class H5adSource:
    """An h5ad file's rows as a direct-mode cell source (interface of reader.DirectSource)."""

    reads_tiledb = False

    def __init__(self, cfg: DataConfig, context=None) -> None:
        if not cfg.vocab_path:
            raise ValueError(
                "direct mode needs vocab_path: a genes.tsv or a list of gene ids (the tokens)"
            )
        self.cfg, self.condition_names = cfg, tuple(cfg.condition_columns)
        self.x = H5adCsr(cfg.source, cfg.layer)
        if self.x.compressed:
            log.warning(
                "%s: %s/%s are compressed, so they are read through h5py, one reader at a time; "
                "an uncompressed copy (adata.write_h5ad(path) without compression) streams "
                "several times faster",
                cfg.source,
                self.x.key,
                "+".join(self.x.compressed),
            )
        vocab = GeneVocab.read(cfg.vocab_path)
        self.vocab_size, self.vocab_fingerprint = len(vocab), vocab.fingerprint()
        tokens, self.dropped_genes = source_tokens(
            vocab, self._feature_ids(), cfg.unknown_genes, cfg.source
        )
        self.var_tokens = np.asarray(tokens, dtype=np.int32)
        # The vocabulary is often the file's genes in order: then a token is the column + 1.
        self._identity = np.array_equal(self.var_tokens, np.arange(1, len(tokens) + 1))
        self.joinids = np.arange(self.x.shape[0], dtype=np.int64)
        self.labels: dict[str, list] = {}  # set by select
        self._cond = np.zeros((0, len(self.condition_names)), dtype=np.int16)

    def _feature_ids(self) -> list[str]:
        """Gene ids in column order: var `feature_id` when present, else the var index."""
        var = ad.io.read_elem(self.x.file["var"])
        ids = var["feature_id"] if "feature_id" in var.columns else var.index
        if len(ids) != self.x.shape[1]:
            raise IngestError(
                f"{self.cfg.source}: var has {len(ids)} genes but {self.x.key} has "
                f"{self.x.shape[1]} columns; the file is inconsistent: write it again"
            )
        return [str(v) for v in ids]

    def fingerprint_parts(self) -> dict:
        """Identity of the data: the file, its size, the query, vocabulary and labels."""
        path = Path(self.cfg.source).resolve()
        return {
            "h5ad": str(path),
            "bytes": path.stat().st_size,
            "layer": self.x.key,
            "obs_filter": self.cfg.obs_filter,
            "vocab": self.vocab_fingerprint,
            "unknown_genes": self.cfg.unknown_genes,
            "labels": self.labels,
        }

    def ids(self, positions: np.ndarray | slice) -> np.ndarray:
        """int64 joinids (row positions) of selection positions."""
        return self.joinids[positions].astype(np.int64)

    def select(self, min_genes: int, split: str, key: str, seed: int, fraction: float) -> float:
        """Keep the query's cells with >= `min_genes` genes in `split`; return their mean nnz.

        Labels come from every cell of the query (before min_genes and the split), as in a
        SOMA direct source, so the train and validation streams of one query share them.
        """
        keep = direct_keep(min_genes, split, seed, fraction)
        split_column = None if key == "soma_joinid" or split == "all" else key
        n = self.x.shape[0]
        fold = ObsFold(n, n, list(self.condition_names), split_column)
        columns = list(
            dict.fromkeys([*self.condition_names, *([split_column] if split_column else [])])
        )
        given = load_labels(self.cfg.labels_path) if self.cfg.labels_path else None
        selected = fold_obs(self._obs_tables(columns), fold, keep, given)
        self.joinids, self._cond, self.labels = selected.joinids, selected.codes, selected.labels
        return selected.nnz_sum / len(self.joinids) if len(self.joinids) else float("nan")

    def _obs_tables(self, columns: list[str]) -> Iterator[pa.Table]:
        """The query's obs (joinid, nnz, `columns`) as Arrow tables of OBS_BLOCK rows."""
        obs = self.x.file["obs"]
        missing = [c for c in columns if c not in obs]
        if missing:
            have = sorted(k for k in obs if not k.startswith("_"))
            raise KeyError(f"obs of {self.cfg.source} has no column(s) {missing}; have {have}")
        values = {c: _dictionary(ad.io.read_elem(obs[c])) for c in columns}
        wanted = self._query_mask()
        nnz = np.diff(self.x.indptr)
        for lo in range(0, self.x.shape[0], OBS_BLOCK):
            hi = min(lo + OBS_BLOCK, self.x.shape[0])
            rows = np.arange(lo, hi)
            rows = rows if wanted is None else rows[wanted[lo:hi]]
            table = {"soma_joinid": rows, "nnz": nnz[rows]}
            table |= {c: values[c].take(pa.array(rows)) for c in columns}
            yield pa.table(table)

    def _query_mask(self) -> np.ndarray | None:
        """Rows that `obs_filter` (a pandas query) keeps; None when there is no filter."""
        if not self.cfg.obs_filter:
            return None
        obs = ad.io.read_elem(self.x.file["obs"])
        try:
            kept = obs.eval(self.cfg.obs_filter)
        except Exception as err:  # pandas raises many types for a bad expression
            raise ValueError(
                f"obs_filter {self.cfg.obs_filter!r} is not a pandas query over the obs of "
                f"{self.cfg.source} ({type(err).__name__}: {err}); columns: {list(obs.columns)}"
            ) from None
        return np.asarray(kept, dtype=bool)

    def read_piece(self, joinids: np.ndarray) -> Piece:
        """Read sorted row positions over all genes; library size before vocabulary mapping."""
        indptr, cols, vals = self.x.read_rows(joinids)
        if self._identity:
            cols += 1  # cols is this read's own array
        else:
            cols = self.var_tokens[cols]
        piece = direct_piece(joinids, Csr(indptr, cols, vals))
        piece.csr = _genes_ascending(piece.csr)
        return piece

    def cell_meta(self, positions: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Return (None: library size comes from the read, conditions int64 (n, A))."""
        return None, self._cond[positions].astype(np.int64)


def _dictionary(column) -> pa.DictionaryArray:
    """An obs column as an Arrow dictionary array of strings, nulls kept.

    anndata stores labels as categoricals, whose codes become the indices: no Python object
    per cell.
    """
    cat = pd.Categorical(column)
    codes = np.asarray(cat.codes, dtype=np.int32)
    indices = pa.array(codes, mask=codes < 0)
    return pa.DictionaryArray.from_arrays(indices, pa.array(cat.categories.astype(str)))


def _genes_ascending(csr: Csr) -> Csr:
    """The CSR with tokens ascending within each row (the stream's contract), sorted if needed.

    anndata does not promise sorted indices, and the vocabulary may order genes differently
    from the file; both usually hold, so a check over the entries is the common cost.
    """
    if len(csr.indices) < 2:
        return csr
    step_up = csr.indices[1:] > csr.indices[:-1]
    starts = csr.indptr[1:-1]
    step_up[starts[(starts > 0) & (starts < len(csr.indices))] - 1] = True  # row boundaries
    if step_up.all():
        return csr
    rows = np.repeat(np.arange(len(csr.indptr) - 1), np.diff(csr.indptr))
    return csr_from_sorted_coo(rows, len(csr.indptr) - 1, csr.indices, csr.data)

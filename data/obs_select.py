"""The selection folded out of the obs one joinid range at a time, into compact arrays.

A direct-mode rank holds one entry per selected cell for the whole run: its joinid and its
condition codes. Reading the whole obs first and selecting after (the simple way) peaked at
~40 B per candidate cell, which made a rank's start-up memory grow with the corpus. Here each
range is filtered (min_genes, split) as soon as it is read, and only the survivors are written
into buffers sized to the obs domain: `np.empty` pages that are never written are never resident,
so memory is what the survivors need, ~4 B (uint32 joinid) + 4 B per condition column while
reading, and 4 + 2 B per column after (int16 label codes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from atlasldm.data.obs_codes import CodedColumn, present_sorted, recode_lookup
from atlasldm.data.split import hash_strings

# (sorted joinids int64, nnz int64 or None, split-key hashes uint64 or None) -> keep mask
KeepRule = Callable[[np.ndarray, np.ndarray | None, np.ndarray | None], np.ndarray]


def joinid_dtype(upper: int) -> np.dtype:
    """uint32 when every joinid < `upper` fits (Census has ~10^8 cells), else int64."""
    return np.dtype(np.uint32) if upper <= 2**32 else np.dtype(np.int64)


def label_code_dtype(n_labels: int) -> np.dtype:
    """int16 when the labels and the unseen/null code fit, else int32."""
    return np.dtype(np.int16) if n_labels < 2**15 - 1 else np.dtype(np.int32)


class _HashedColumn(CodedColumn):
    """A coded column whose distinct values' split hashes are computed once each."""

    def __init__(self) -> None:
        super().__init__()
        self._hashes = np.zeros(0, np.uint64)

    def hashes(self, codes: np.ndarray) -> np.ndarray:
        """uint64 hash per code; null (-1) hashes as ""."""
        if len(self._hashes) != len(self.values) + 1:  # new values since the last range
            self._hashes = hash_strings(["" if v is None else v for v in self.values] + [""])
        return self._hashes[codes]  # -1 picks the trailing ""


@dataclass
class SelectedObs:
    """The selected cells: ascending joinids, label codes, the candidates' labels, nnz sum."""

    joinids: np.ndarray  # joinid_dtype (n,), ascending
    codes: np.ndarray  # label_code_dtype (n, A): index into labels[column]; len(labels) = other
    labels: dict[str, list]  # column -> sorted labels (given, or present among the candidates)
    nnz_sum: int
    nnz_known: bool


class ObsFold:
    """Fold obs tables (ascending joinid ranges) into the cells that `keep` selects."""

    def __init__(self, capacity: int, id_upper: int, conditions: list[str], split_key: str | None):
        self.conditions, self.split_key = conditions, split_key
        self.coded = {c: _HashedColumn() for c in dict.fromkeys([*conditions, split_key]) if c}
        self.present = {c: np.zeros(0, bool) for c in conditions}
        self.ids = np.empty(capacity, joinid_dtype(id_upper))  # untouched pages cost nothing
        self.codes = np.empty((capacity, len(conditions)), np.int32)
        self.n, self.nnz_sum, self.nnz_known = 0, 0, False

    def add(self, table: pa.Table, keep: KeepRule) -> None:
        """Select the rows of one table (any order) and append them in joinid order."""
        ids = table["soma_joinid"].to_numpy().astype(np.int64)
        order = None if np.all(ids[1:] > ids[:-1]) else np.argsort(ids, kind="stable")
        pick = (lambda a: a) if order is None else (lambda a: a[order])
        ids = pick(ids)
        has_nnz = "nnz" in table.column_names
        nnz = pick(table["nnz"].to_numpy().astype(np.int64)) if has_nnz else None
        codes = {c: pick(col.encode(table[c])) for c, col in self.coded.items()}
        for c in self.conditions:  # labels come from every candidate, before min_genes/split
            self._mark_present(c, codes[c])
        split = (
            None
            if self.split_key is None
            else self.coded[self.split_key].hashes(codes[self.split_key])
        )
        mask = keep(ids, nnz, split)
        n = int(mask.sum())
        self.ids[self.n : self.n + n] = ids[mask]
        for a, c in enumerate(self.conditions):
            self.codes[self.n : self.n + n, a] = codes[c][mask]
        self.n += n
        if nnz is not None:
            self.nnz_sum, self.nnz_known = self.nnz_sum + int(nnz[mask].sum()), True

    def _mark_present(self, column: str, codes: np.ndarray) -> None:
        seen = np.zeros(len(self.coded[column].values), bool)
        seen[: len(self.present[column])] = self.present[column]
        seen[codes[codes >= 0]] = True
        self.present[column] = seen

    def result(self, labels: dict[str, list] | None, block: int = 1 << 20) -> SelectedObs:
        """The selection, codes mapped onto `labels` (default: sorted labels present)."""
        if labels is None:
            labels = {}
        labels = {
            c: labels[c]
            if c in labels
            else present_sorted((np.flatnonzero(self.present[c]), self.coded[c].values))
            for c in self.conditions
        }
        out = np.empty(
            (self.n, len(self.conditions)),
            label_code_dtype(max((len(v) for v in labels.values()), default=0)),
        )
        for a, c in enumerate(self.conditions):
            lookup = recode_lookup(self.coded[c].values, labels[c])  # unseen, null: len(labels)
            for lo in range(0, self.n, block):
                out[lo : lo + block, a] = lookup[self.codes[lo : min(lo + block, self.n), a]]
        ids = self.ids[: self.n]
        if self.n < len(self.ids) // 4:  # a narrow query: do not keep the domain-sized buffer
            ids = ids.copy()
        self.ids = self.codes = np.empty(0)
        return SelectedObs(ids, out, labels, self.nnz_sum, self.nnz_known)


def fold_obs(
    tables: Iterable[pa.Table], fold: ObsFold, keep: KeepRule, labels: dict[str, list] | None
) -> SelectedObs:
    """Run `fold` over the range tables and return its result."""
    for table in tables:
        fold.add(table, keep)
    return fold.result(labels)

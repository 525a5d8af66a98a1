"""Obs columns read in bounded chunks into compact arrays: joinids, nnz and label codes.

A direct-mode selection is the query's whole obs; building it through one Arrow table and a
Python list per cell cost seconds and GBs at millions of cells. Here every chunk is dictionary
encoded in Arrow and folded into int32 codes against a growing table of distinct values, so
memory is ~8 B (joinid) + 8 B (nnz) + 4 B per label column per cell, plus one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from atlasldm.data.split import hash_coded_strings


def dictionary_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list]:
    """Return (int64 codes into the distinct values, -1 for null; the distinct values).

    Vectorised in Arrow: a Python list per cell would cost seconds and GBs at atlas scale.
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_dictionary(array.type):
        array = array.dictionary_encode()
    codes = array.indices.to_numpy(zero_copy_only=False)
    codes = np.where(array.is_null().to_numpy(zero_copy_only=False), -1, codes)
    return codes.astype(np.int64), array.dictionary.to_pylist()


def hashes_of(coded: tuple[np.ndarray, list]) -> np.ndarray:
    """uint64 split hash per cell from (codes, values); a null value hashes as ""."""
    codes, values = coded  # code -1 (null) indexes the "" that hash_coded_strings appends
    return hash_coded_strings(codes, ["" if v is None else v for v in values])


@dataclass
class CodedColumn:
    """A label column as int32 codes into `values` (-1 = null), built chunk by chunk."""

    values: list = field(default_factory=list)
    parts: list[np.ndarray] = field(default_factory=list)
    _index: dict = field(default_factory=dict)

    def encode(self, column: pa.ChunkedArray) -> np.ndarray:
        """Return a chunk's int32 codes, mapping its local dictionary onto the global values."""
        codes, local = dictionary_codes(column)
        for value in local:
            if value not in self._index:
                self._index[value] = len(self.values)
                self.values.append(value)
        lookup = np.array([self._index[v] for v in local] + [-1], dtype=np.int32)
        return lookup[codes]

    def add(self, column: pa.ChunkedArray) -> None:
        """Append a chunk's codes."""
        self.parts.append(self.encode(column))

    def codes(self, order: np.ndarray | None) -> np.ndarray:
        """All codes (in joinid order when `order` is given); the parts are released."""
        codes = np.concatenate(self.parts) if self.parts else np.zeros(0, np.int32)
        self.parts = []
        return codes if order is None else codes[order]


@dataclass
class ObsColumns:
    """The selection's obs, sorted by joinid: joinids, optional nnz, coded label columns."""

    joinids: np.ndarray  # int64 (n,)
    nnz: np.ndarray | None  # int64 (n,)
    coded: dict[str, tuple[np.ndarray, list]]  # column -> (int32 codes, -1 null; values)


def read_obs(batches, columns: list[str], with_nnz: bool) -> ObsColumns:
    """Fold an iterator of obs Arrow tables (soma_joinid, `columns`, nnz) into ObsColumns."""
    joinids, nnz, coded = [], [], {c: CodedColumn() for c in columns}
    for table in batches:
        joinids.append(table["soma_joinid"].to_numpy().astype(np.int64))
        if with_nnz:
            nnz.append(table["nnz"].to_numpy().astype(np.int64))
        for name, column in coded.items():
            column.add(table[name])
    ids = np.concatenate(joinids) if joinids else np.zeros(0, np.int64)
    order = None if np.all(ids[1:] > ids[:-1]) else np.argsort(ids, kind="stable")
    pick = (lambda a: a) if order is None else (lambda a: a[order])
    counts = pick(np.concatenate(nnz)) if with_nnz and nnz else None
    if with_nnz and counts is None:
        counts = np.zeros(0, np.int64)
    return ObsColumns(pick(ids), counts, {n: (c.codes(order), c.values) for n, c in coded.items()})


def recode_lookup(values: list, vocabulary: list) -> np.ndarray:
    """int32 table: code i -> index of values[i] in `vocabulary`; its last entry (code -1, null)
    and unseen values -> len(vocabulary)."""
    index = {v: i for i, v in enumerate(vocabulary)}
    null = len(vocabulary)
    return np.array([index.get(v, null) for v in values] + [null], dtype=np.int32)


def present_sorted(coded: tuple[np.ndarray, list]) -> list:
    """Sorted distinct non-null values that occur in the coded column."""
    codes, values = coded
    return sorted(values[i] for i in np.unique(codes[codes >= 0]))

"""Rows of an h5ad file's CSR matrix, read by file position: no h5py call per read.

h5py serialises every read behind one global lock and costs tens of microseconds per call, so a
stream that reads thousands of short row spans per second through it is bound by h5py, not by
the disk. An uncompressed HDF5 dataset, contiguous or chunked, is a list of byte ranges in the
file. They are located once at open (`_ByteMap`), and then a span of elements is one or a few
`os.preadv` calls into the output array, which release the GIL and are safe from several reader
threads at once.

A compressed or filtered dataset cannot be read by position. It is read through h5py, under a
lock, and the source warns once, with how to rewrite the file uncompressed.

Shape legend: N rows (cells), G columns (genes), nnz stored entries.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import h5py
import numpy as np

from atlasldm.data.npy_reads import pread_full
from atlasldm.data.validate import IngestError


class _ByteMap:
    """Where each stored element of an uncompressed 1-D dataset lies in the file."""

    def __init__(self, ds: h5py.Dataset) -> None:
        self.itemsize = ds.dtype.itemsize
        self.dtype = ds.dtype
        if ds.chunks is None:  # contiguous: one range
            offset = ds.id.get_offset()
            self.chunk_len = max(int(ds.shape[0]), 1)
            self.offsets = np.array([0 if offset is None else offset], dtype=np.int64)
            return
        self.chunk_len = int(ds.chunks[0])
        n_chunks = -(-int(ds.shape[0]) // self.chunk_len)
        self.offsets = np.full(n_chunks, -1, dtype=np.int64)  # -1: never written (fill value)

        def record(info) -> None:
            self.offsets[info.chunk_offset[0] // self.chunk_len] = info.byte_offset

        ds.id.chunk_iter(record)
        if np.any(self.offsets < 0):
            raise IngestError(
                f"{ds.file.filename}: {ds.name} has chunks that were never written; the file "
                "is incomplete: write it again"
            )
        if np.all(np.diff(self.offsets) == self.chunk_len * self.itemsize):
            # Chunks stored back to back in order (as anndata writes them): one range.
            self.chunk_len, self.offsets = max(int(ds.shape[0]), 1), self.offsets[:1]

    def ranges(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """(file byte offset, bytes) runs holding elements [lo, hi), adjacent runs merged."""
        out: list[tuple[int, int]] = []
        pos = lo
        while pos < hi:
            chunk, within = divmod(pos, self.chunk_len)
            take = min(hi - pos, self.chunk_len - within)
            start = int(self.offsets[chunk]) + within * self.itemsize
            size = take * self.itemsize
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + size)
            else:
                out.append((start, size))
            pos += take
        return out


class _Positional:
    """Element spans of an uncompressed dataset by positional reads of the file."""

    def __init__(self, path: Path, fd: int, ds: h5py.Dataset) -> None:
        self.path, self.fd, self.map = path, fd, _ByteMap(ds)
        self.dtype = self.map.dtype

    def read_into(self, lo: int, hi: int, out: np.ndarray) -> None:
        """Elements [lo, hi) into `out` (their dtype, hi - lo long), straight from the file."""
        view, done = memoryview(out).cast("B"), 0
        for start, size in self.map.ranges(lo, hi):
            if pread_full(self.fd, view[done : done + size], start) < size:
                raise IngestError(f"{self.path} ends inside its X: the file is truncated")
            done += size


class _Locked:
    """Element spans of a compressed dataset through h5py, one reader at a time."""

    def __init__(self, ds: h5py.Dataset, lock: threading.Lock) -> None:
        self.ds, self.lock, self.dtype = ds, lock, ds.dtype

    def read_into(self, lo: int, hi: int, out: np.ndarray) -> None:
        """Elements [lo, hi) into `out` (their dtype, hi - lo long)."""
        if hi <= lo:  # h5py refuses an empty selection
            return
        with self.lock:
            self.ds.read_direct(out, np.s_[lo:hi])


def positional(ds: h5py.Dataset) -> bool:
    """True when the dataset's bytes are stored as they are (no compression or other filter)."""
    return not ds.id.get_create_plist().get_nfilters()


class H5adCsr:
    """Row spans of an h5ad's CSR matrix (`X` or `layers/<name>`), thread-safe."""

    def __init__(self, path: str | Path, layer: str = "") -> None:
        self.path = Path(path)
        self.file = open_h5ad(self.path)
        self.key = f"layers/{layer}" if layer and f"layers/{layer}" in self.file else "X"
        group = self.file[self.key]
        check_csr(self.path, self.key, group)
        self.shape = tuple(int(x) for x in group.attrs["shape"])
        self.indptr = group["indptr"][:].astype(np.int64)  # 8 B per cell, read once
        self.fd = os.open(self.path, os.O_RDONLY)
        lock = threading.Lock()
        self.compressed = [k for k in ("data", "indices") if not positional(group[k])]
        self.data, self.indices = (
            _Positional(self.path, self.fd, group[k])
            if positional(group[k])
            else _Locked(group[k], lock)
            for k in ("data", "indices")
        )

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr from 0, int32 column ids, float32 values) of the sorted row positions `rows`.

        Each run of consecutive rows is one span of the file's arrays, read straight into its
        place in the output: no per-span array and no concatenation.
        """
        lengths = self.indptr[rows + 1] - self.indptr[rows]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)  # first row of each run
        ends = np.append(starts[1:], len(rows))
        outputs = []
        for source, dtype in ((self.indices, np.int32), (self.data, np.float32)):
            out = np.empty(int(indptr[-1]), dtype=source.dtype)
            for i, j in zip(starts.tolist(), ends.tolist(), strict=True):
                lo, hi = int(rows[i]), int(rows[j - 1]) + 1
                span = out[indptr[i] : indptr[j]]
                source.read_into(int(self.indptr[lo]), int(self.indptr[hi]), span)
            outputs.append(out.astype(dtype, copy=False))
        return indptr, outputs[0], outputs[1]

    def close(self) -> None:
        """Release the file handle and descriptor."""
        os.close(self.fd)
        self.file.close()


def open_h5ad(path: Path) -> h5py.File:
    """The h5ad opened read-only; one line naming the file when it is missing or not HDF5."""
    if not path.is_file():
        raise IngestError(f"{path}: no such h5ad file; check data.source")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise IngestError(
            f"{path} is not a readable h5ad ({str(err).splitlines()[0]}); it is damaged or "
            "not HDF5: write it again with anndata"
        ) from None


def check_csr(path: Path, key: str, group) -> None:
    """Refuse an X that is not a CSR matrix with one line that says how to rewrite it."""
    encoding = group.attrs.get("encoding-type", "") if isinstance(group, h5py.Group) else "dense"
    if encoding != "csr_matrix":
        raise IngestError(
            f"{path}: {key} is stored as {encoding or 'an unknown encoding'}, but direct mode "
            "reads rows of a CSR matrix; rewrite it with "
            "`adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(path)`"
        )
    missing = [k for k in ("data", "indices", "indptr") if k not in group]
    if missing or "shape" not in group.attrs:
        raise IngestError(f"{path}: {key} lacks {missing or ['shape']}; the file is damaged")

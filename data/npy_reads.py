"""Positional reads of .npy files: the loader's side arrays and row store, never mapped.

A memory map would be simpler, but every page it touches stays in the rank's resident set, so a
rank's RSS would grow with the corpus as an epoch touches more of it. `pread` puts the bytes
in the shared page cache instead, and is safe from several reader threads at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from atlasldm.data.validate import IngestError

TAKE_GAP = 4096  # ids this close are read in one call (a few KB extra beats another syscall)


def pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from file offset `offset`; return the bytes read (fewer only at end of file).

    pread may return short counts, so it is repeated until the view is full or the file ends.
    """
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def npy_header(path: Path) -> tuple[int, np.dtype, tuple[int, ...]]:
    """(data offset in bytes, dtype, shape) of a .npy file; IngestError names a garbage one."""
    with open(path, "rb") as fh:
        try:
            major, _ = np.lib.format.read_magic(fh)
            shape, _, dtype = getattr(np.lib.format, f"read_array_header_{major}_0")(fh)
        except (ValueError, EOFError, SyntaxError, AttributeError) as err:
            # numpy raises several types for a damaged header; the caller needs the file's name
            raise IngestError(f"{path} is not a valid .npy file ({err}): it is damaged") from None
        return fh.tell(), dtype, shape


class NpyFile:
    """Positional reads of a .npy file's elements: thread-safe, and never mapped.

    Reading with pread instead of a memory map keeps a rank's RSS flat in the corpus size: the
    pages it reads stay in the (shared, reclaimable) page cache, not in its resident set, where
    a map's touched pages and readahead accumulate over an epoch.
    """

    def __init__(self, path: Path) -> None:
        self.offset, self.dtype, shape = npy_header(path)
        self.length = int(np.prod(shape))
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Elements [lo, hi) as a new array."""
        out = np.empty(max(hi - lo, 0), dtype=self.dtype)
        start = self.offset + lo * self.dtype.itemsize
        if pread_full(self.fd, memoryview(out).cast("B"), start) < out.nbytes:
            raise IngestError(f"{self.path} ends before element {hi}: the file is damaged")
        return out

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Elements at `ids` (any order): one read per group of nearby ids."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros(0, dtype=self.dtype)
        uniq, inverse = np.unique(ids, return_inverse=True)
        groups = np.split(uniq, np.flatnonzero(np.diff(uniq) > TAKE_GAP) + 1)
        values = [self.read(int(g[0]), int(g[-1]) + 1)[g - g[0]] for g in groups]
        return np.concatenate(values)[inverse]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole array (np.asarray(store.counts)), for checks and tools."""
        whole = self.read(0, self.length)
        return whole if dtype is None else whole.astype(dtype)

    def close(self) -> None:
        os.close(self.fd)

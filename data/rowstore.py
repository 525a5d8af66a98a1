"""Row store of a training copy: X as memory-mapped CSR arrays beside the SOMA experiment.

`<copy>/rows/` holds `indptr.npy` (int64, N+1), `genes.npy` (vocabulary tokens, uint16 when the
vocabulary allows, else int32) and `counts.npy` (uint16 when every count is an integer below
65,536, else float32), `layout.json` (the nnz offset of every write block and the dtypes) and
`rows.json`, written last: a folder without it is ignored. The SOMA experiment stays the copy's
interoperable form; the row store holds the same entries in copy-row order, so reading a batch is
a gather from the page cache instead of a TileDB decode (most of the CPU time of a copy read
through TileDB). 4 bytes per nonzero at most sizes.

Written during the ingest's gather pass, no serial pass: once the scatter pass has counted every
block's nonzeros and the largest count, the arrays are preallocated at their final size
(`create_store`) and each worker writes the rows of the blocks it gathers at their offsets
(`RowWriter`, positioned writes), then `.progress/rows_<b>.done`. The finalizer fills any block
without a marker from the copy's X and writes rows.json (`complete_store`). Copies without a row
store get one from `python -m atlasldm.data.rowstore COPY` (one pass over X).
Shape legend: N cells, nnz.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tiledbsoma

from atlasldm.data.copy_files import record_row_store, rows_recorded
from atlasldm.data.csr import Csr, gather_positions
from atlasldm.data.materialize import progress_dir
from atlasldm.data.npy_reads import NpyFile, npy_header
from atlasldm.data.soma import read_coo
from atlasldm.data.validate import IngestError
from atlasldm.data.vocab import atomic_write_text

log = logging.getLogger(__name__)

FOLDER, MARKER, LAYOUT = "rows", "rows.json", "layout.json"
LOCK = ".rows.lock"  # held while the store is built from X
UINT16_MAX = np.iinfo(np.uint16).max
PWRITE_MAX = 1 << 30  # bytes per os.pwrite call: Linux writes at most ~2 GiB per call


class CountOverflowError(ValueError):
    """A count does not fit the compact dtype; the store is rebuilt with float32 counts."""


def row_store_dir(copy: str | Path) -> Path:
    """Return `<copy>/rows`."""
    return Path(copy) / FOLDER


def has_row_store(copy: str | Path) -> bool:
    """Return True when the copy holds a complete row store (its marker exists)."""
    return (row_store_dir(copy) / MARKER).is_file()


def genes_dtype(n_genes: int) -> str:
    """Token dtype: uint16 while every token 1..n_genes fits, else int32."""
    return "uint16" if n_genes < UINT16_MAX else "int32"


def counts_dtype(max_count: float) -> str:
    """Count dtype for integer counts up to max_count: uint16 when they fit, else float32."""
    return "uint16" if max_count <= UINT16_MAX else "float32"


@dataclass(frozen=True)
class RowLayout:
    """Where each write block's rows go, fixed before any row is written so that workers agree.

    Block b holds cells [b*block_cells, (b+1)*block_cells) and entries [offsets[b], offsets[b+1]).
    """

    n_cells: int
    block_cells: int
    offsets: tuple[int, ...]  # n_blocks + 1 nnz offsets
    genes_dtype: str
    counts_dtype: str

    @classmethod
    def from_block_nnz(cls, n_cells, block_cells, block_nnz, n_genes, max_count) -> RowLayout:
        """Layout from the nonzeros of each block and the largest count."""
        offsets = np.zeros(len(block_nnz) + 1, dtype=np.int64)
        np.cumsum(block_nnz, out=offsets[1:])
        return cls(
            int(n_cells),
            int(block_cells),
            tuple(int(x) for x in offsets),
            genes_dtype(n_genes),
            counts_dtype(max_count),
        )

    @property
    def nnz(self) -> int:
        """Entries in the store."""
        return self.offsets[-1]

    @property
    def n_blocks(self) -> int:
        """Write blocks."""
        return len(self.offsets) - 1

    def block_range(self, b: int) -> tuple[int, int]:
        """Cells [lo, hi) of block b."""
        return b * self.block_cells, min((b + 1) * self.block_cells, self.n_cells)

    def arrays(self) -> dict[str, tuple[str, int]]:
        """{name: (dtype, length)} of the store's arrays."""
        return {
            "indptr": ("int64", self.n_cells + 1),
            "genes": (self.genes_dtype, self.nnz),
            "counts": (self.counts_dtype, self.nnz),
        }


def load_layout(folder: Path) -> RowLayout | None:
    """The layout of a (possibly unfinished) store, or None when none was created."""
    path = Path(folder) / LAYOUT
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    return RowLayout(**{**meta, "offsets": tuple(meta["offsets"])})


def create_store(folder: Path, layout: RowLayout) -> RowLayout:
    """Preallocate the arrays of `layout` in `folder` (kept if present), then write layout.json.

    Safe when several workers call it at once: each array appears under its name only complete
    (os.link of a sized temporary file, which never replaces), and every caller derives the same
    layout from the same spill, so layout.json is rewritten with identical content.
    """
    folder = Path(folder)
    existing = load_layout(folder)
    if existing is not None:
        if existing != layout:
            raise IngestError(f"{folder}: layout.json disagrees with this ingest; delete {folder}")
        return existing
    folder.mkdir(parents=True, exist_ok=True)
    for name, (dtype, length) in layout.arrays().items():
        _preallocate(folder / f"{name}.npy", np.dtype(dtype), length)
    atomic_write_text(folder / LAYOUT, json.dumps(asdict(layout)) + "\n")
    return layout


def _preallocate(path: Path, dtype: np.dtype, length: int) -> None:
    """Create a zero-filled (sparse) .npy of `length` values unless a matching one exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": (length,),
    }
    with open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.truncate(fh.tell() + length * dtype.itemsize)  # no data written: O(1) at any size
    try:
        os.link(tmp, path)
    except FileExistsError:  # another worker (or an earlier run) created it: keep its rows
        if npy_header(path)[1:] != (dtype, (length,)):
            raise IngestError(f"{path} has another dtype or shape; delete {path.parent}") from None
    finally:
        tmp.unlink()


class RowWriter:
    """Writes whole blocks of rows into a preallocated store at the layout's offsets.

    Positioned writes (os.pwrite) touch only the block's byte ranges, so workers writing other
    blocks of the same files never interfere and nothing is mapped. With `marks`, a block's
    marker `rows_<b>.done` is created after its three ranges are written: a block without it is
    never trusted and is written again.
    """

    def __init__(self, folder: Path, layout: RowLayout, marks: Path | None = None) -> None:
        self.layout, self.marks = layout, marks
        self._files = {}
        for name in layout.arrays():
            path = Path(folder) / f"{name}.npy"
            offset, dtype, _ = npy_header(path)
            self._files[name] = (os.open(path, os.O_WRONLY), offset, dtype)

    def write(self, b: int, indptr: np.ndarray, tokens: np.ndarray, counts: np.ndarray) -> None:
        """Write block b: local indptr (cells + 1), tokens and counts in row order."""
        lo, hi = self.layout.block_range(b)
        start, stop = self.layout.offsets[b], self.layout.offsets[b + 1]
        if len(indptr) != hi - lo + 1 or int(indptr[-1]) != stop - start:
            raise RuntimeError(
                f"row store block {b}: {len(indptr) - 1} cells x {int(indptr[-1])} entries, "
                f"layout says {hi - lo} x {stop - start}; delete the copy and ingest again"
            )
        compact = self._cast("counts", counts)
        if compact.dtype == np.uint16 and not np.array_equal(compact, counts):  # wrapped/fraction
            raise CountOverflowError(f"rows {lo}..{hi - 1} hold counts beyond uint16")
        self._put("indptr", lo + 1, np.asarray(indptr[1:], dtype=np.int64) + start)
        self._put("genes", start, self._cast("genes", tokens))
        self._put("counts", start, compact)
        if self.marks is not None:
            block_marker(self.marks, b).touch()

    def write_csr(self, b: int, X) -> None:
        """Write block b from a scipy CSR (cells x genes, sorted columns): token = column + 1."""
        self.write(b, X.indptr, X.indices + 1, X.data)

    def _cast(self, name: str, values: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(values, dtype=self._files[name][2])

    def _put(self, name: str, index: int, values: np.ndarray) -> None:
        fd, offset, dtype = self._files[name]
        data = memoryview(values).cast("B")
        pos = offset + index * dtype.itemsize
        while len(data):
            done = os.pwrite(fd, data[:PWRITE_MAX], pos)
            data, pos = data[done:], pos + done

    def close(self) -> None:
        """Close the files (writes already reached the page cache)."""
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files = {}


def block_marker(marks: Path, b: int) -> Path:
    """Marker of a written row-store block."""
    return Path(marks) / f"rows_{b:06d}.done"


def complete_store(copy: str | Path, block_cells: int = 16384) -> Path:
    """Finish `<copy>/rows` after manifest.json; returns it.

    A store of this copy is kept; one whose blocks were written during the ingest gets the blocks
    without a marker from X (none normally: only a worker run with --no-row-store leaves some)
    and rows.json; anything else is built in one pass over X (`build_row_store(copy,
    block_cells)`).
    """
    copy, folder = Path(copy), row_store_dir(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    if has_row_store(copy) and _meta(folder).get("copy_fingerprint") == manifest["fingerprint"]:
        if "files" in manifest and not rows_recorded(manifest):  # killed before recording
            record_row_store(copy)
        return folder
    layout = load_layout(folder)
    # Markers number the ingest's blocks: a layout of other blocks (or cells) cannot use them.
    ingest_layout = layout is not None and (layout.n_cells, layout.block_cells) == (
        manifest["n_cells"],
        manifest["block_cells"],
    )
    if not ingest_layout or has_row_store(copy):
        return build_row_store(copy, block_cells)
    marks = progress_dir(copy)
    missing = [b for b in range(layout.n_blocks) if not block_marker(marks, b).is_file()]
    if missing:
        log.warning(
            "row store: %d of %d blocks unwritten; reading them from X",
            len(missing),
            layout.n_blocks,
        )
        _fill_from_x(copy, RowWriter(folder, layout, marks), missing)
    _write_meta(folder, layout, manifest)
    record_row_store(copy)
    return folder


def build_row_store(copy: str | Path, block_cells: int = 16384) -> Path:
    """Write `<copy>/rows` from the copy's X in blocks of rows (bounded memory); return it.

    Counts go to uint16 when they all fit (integers below 65,536), else to float32.
    """
    copy = Path(copy)
    with open(copy / LOCK, "a") as lock:
        # Builders take turns, so a temporary folder seen under the lock belongs to a builder
        # that was killed: it is removed here, not left behind (it is as large as the store).
        fcntl.flock(lock, fcntl.LOCK_EX)
        _remove_build_folders(copy)
        return _build_row_store(copy, block_cells)


def remove_interrupted_builds(copy: str | Path) -> None:
    """Remove temporary folders of killed row-store builds, unless a build is running now."""
    copy = Path(copy)
    with open(copy / LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live build holds the lock; its folder is not stale
            return
        _remove_build_folders(copy)


def _remove_build_folders(copy: Path) -> None:
    """Remove `.rows.tmp<pid>` folders; call with the build lock held."""
    for stale in copy.glob(f".{FOLDER}.tmp*"):
        log.warning("removing %s, left by an interrupted row-store build", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _build_row_store(copy: Path, block_cells: int) -> Path:
    """build_row_store's work, under its lock."""
    manifest = json.loads((copy / "manifest.json").read_text())
    n, n_genes = int(manifest["n_cells"]), int(manifest["n_genes"])
    nnz = np.load(copy / "side" / "nnz.npy").astype(np.int64)
    block_nnz = np.add.reduceat(nnz, np.arange(0, n, block_cells))
    out = row_store_dir(copy)
    for max_count in (UINT16_MAX, np.inf):  # try uint16 counts, else float32
        layout = RowLayout.from_block_nnz(n, block_cells, block_nnz, n_genes, max_count)
        tmp = out.with_name(f".{FOLDER}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        create_store(tmp, layout)
        try:
            _fill_from_x(copy, RowWriter(tmp, layout), range(layout.n_blocks))
        except CountOverflowError as exc:
            log.info("row store: %s; writing float32 counts", exc)
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        _write_meta(tmp, layout, manifest)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        record_row_store(copy)
        return out
    raise AssertionError("unreachable: float32 holds every count")


def _fill_from_x(copy: Path, writer: RowWriter, blocks) -> None:
    """Write `blocks` of the store from the copy's X (one TileDB read per block)."""
    try:
        with tiledbsoma.Experiment.open(str(copy / "experiment")) as exp:
            X = exp.ms["RNA"].X["raw"]
            for b in blocks:
                lo, hi = writer.layout.block_range(b)
                writer.write(b, *_x_rows(X, lo, hi))
                log.info("row store: cells %d..%d", lo, hi - 1)
    finally:
        writer.close()


def _x_rows(X: tiledbsoma.SparseNDArray, lo: int, hi: int) -> tuple[np.ndarray, ...]:
    """(local indptr, tokens, counts) of copy rows [lo, hi), genes ascending per row."""
    dim0, dim1, data = read_coo(X, slice(lo, hi - 1))
    key = (dim0 - lo) << 32 | dim1  # (row, gene); TileDB returns a copy block sorted
    if len(key) > 1 and not np.all(key[1:] > key[:-1]):
        order = np.argsort(key, kind="stable")
        dim0, dim1, data = dim0[order], dim1[order], data[order]
    indptr = np.zeros(hi - lo + 1, dtype=np.int64)
    np.cumsum(np.bincount(dim0 - lo, minlength=hi - lo), out=indptr[1:])
    return indptr, dim1 + 1, data  # var soma_joinid g is token g + 1


def _meta(folder: Path) -> dict:
    return json.loads((Path(folder) / MARKER).read_text())


def _write_meta(folder: Path, layout: RowLayout, manifest: dict) -> None:
    """rows.json, last: it marks the store complete and names the copy it belongs to."""
    meta = {
        "n_cells": layout.n_cells,
        "nnz": layout.nnz,
        "genes_dtype": layout.genes_dtype,
        "counts_dtype": layout.counts_dtype,
        "copy_fingerprint": manifest.get("fingerprint", ""),
    }
    atomic_write_text(Path(folder) / MARKER, json.dumps(meta, indent=1) + "\n")


class RowStore:
    """Reads sorted copy rows from the store's arrays with positional reads."""

    def __init__(self, copy: str | Path) -> None:
        folder = row_store_dir(copy)
        self.meta = json.loads((folder / MARKER).read_text())
        self.indptr = NpyFile(folder / "indptr.npy")
        self.genes = NpyFile(folder / "genes.npy")
        self.counts = NpyFile(folder / "counts.npy")

    def read(self, joinids: np.ndarray) -> Csr:
        """Return the CSR (tokens int32, counts float32) of sorted copy rows `joinids`."""
        if len(joinids) == 0:
            return Csr(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
        first = int(joinids[0])
        bounds = self.indptr.read(first, int(joinids[-1]) + 2)  # one read covers every row
        starts = bounds[joinids - first]
        lengths = bounds[joinids - first + 1] - starts
        positions, indptr = gather_positions(starts, lengths)
        lo, hi = int(starts[0]), int(starts[-1] + lengths[-1])
        # One contiguous read per array, then a local gather of the wanted rows.
        genes = self.genes.read(lo, hi)[positions - lo].astype(np.int32)
        counts = self.counts.read(lo, hi)[positions - lo].astype(np.float32)
        return Csr(indptr, genes, counts)

    def close(self) -> None:
        """Close the store's files."""
        for array in (self.indptr, self.genes, self.counts):
            array.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m atlasldm.data.rowstore COPY [--block-cells N] [--rebuild]`: add a row store.

    A complete store of the copy is kept and one left unfinished by the ingest is completed,
    unless --rebuild.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("copy", type=Path)
    p.add_argument("--block-cells", type=int, default=16384)
    p.add_argument("--rebuild", action="store_true", help="write the store again from X")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not (args.copy / "manifest.json").is_file():
        raise SystemExit(f"error: {args.copy} is not a finished training copy (no manifest.json)")
    if args.block_cells < 1:
        raise SystemExit(f"error: --block-cells must be positive, got {args.block_cells}")
    build = build_row_store if args.rebuild else complete_store
    print(build(args.copy, args.block_cells))


if __name__ == "__main__":
    main()

"""Two-pass (scatter/gather) shuffle of the training copy through local spill files.

Why: output block b holds the source cells order[b*B:(b+1)*B] (B = block_cells), spread over
the whole source. Reading them by coordinates decompresses nearly every source X tile once per
block (Census layout: 2,048-cell x 2,048-gene zstd tiles), so every block costs about a decode
of the whole source, several times a contiguous block's read, and the ingest grows as N^2.
Here the source is read once, in joinid order, and the permutation is applied on local disk.

Pass 1, scatter of chunk c = the sorted selected joinids [c*B, (c+1)*B): one coordinate read
over a compact range (a slice when the selection is dense), counts validated exactly as before
(`validate.check_counts`, --round-counts), unselected genes dropped, and the chunk's cells,
sorted by output position, written to `.progress/spill/chunk_<c>.*`:

- `cells.npy`  structured (pos int64, start int64, library float32, nnz int32), one per cell;
- `vals.npy`   structured (col int32, val float32), one per stored count, cell after cell;
- `blocks.npy` int64 (n_blocks + 1,): the chunk's cells of block b are [blocks[b], blocks[b+1]);
- `obs.arrow`  the cells' obs columns (Arrow IPC file, categoricals decoded), same row order;
- `rowstats.npy` int64 (n_blocks + 1,): the chunk's stored counts in each output block, then its
  largest count: summed over chunks (`row_stats`), they fix the row store's layout before the
  gather pass (data/rowstore.py), without another pass over the counts;

then `spill/scatter_<c>.done`. Each file goes to a temporary name and is os.replace'd, so a chunk
rewritten after a crash or by two workers at once gets identical content.

Pass 2, gather of block b (after every chunk is scattered): memory-map each chunk's files, take
the block's slice of each, order the rows by output position and write them with
`materialize.write_block` (contiguous rows: one X and one obs fragment, and the block's slice of
the row store when a `rowstore.RowWriter` is given). The spill is deleted by
`materialize.finalize` after manifest.json, not per block: a block's rows live in every chunk.

Disk: about 8 bytes per stored count plus 24 bytes and the obs row per cell (Census, 60M cells
x ~2,000 counts: ~1 TB). Memory: one chunk in pass 1 (~60 bytes per stored count, as a block
before), one block in pass 2 (~30 bytes per stored count) plus page cache.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma

from atlasldm.data import materialize as mat
from atlasldm.data import soma
from atlasldm.data.validate import check_counts, library_sizes

logger = logging.getLogger(__name__)

CELL_DTYPE = np.dtype([("pos", "<i8"), ("start", "<i8"), ("library", "<f4"), ("nnz", "<i4")])
VAL_DTYPE = np.dtype([("col", "<i4"), ("val", "<f4")])


def _chunk_file(out: Path, c: int, kind: str) -> Path:
    """Spill file `kind` (cells.npy, vals.npy, blocks.npy, obs.arrow) of source chunk c."""
    return mat.spill_dir(out) / f"chunk_{c:06d}.{kind}"


def scatter_done(out: Path, c: int) -> bool:
    """Whether source chunk c has been fully spilled."""
    return (mat.spill_dir(out) / f"scatter_{c:06d}.done").is_file()


def spill_bytes(out: Path) -> int:
    """Bytes currently held by the spill folder."""
    folder = mat.spill_dir(out)
    return sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0


def _tmp(path: Path) -> Path:
    """Temporary sibling of path, unique per process (two workers may write the same chunk)."""
    return path.with_name(f".{path.name}.{os.getpid()}")


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """np.save to a temporary file, then os.replace."""
    tmp = _tmp(path)
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
    os.replace(tmp, path)


def _out_pos(out: Path) -> np.ndarray:
    """Output row of each sorted selected cell (argsort of order.npy), memory-mapped.

    The sorted joinids themselves are order[out_pos], so one int64 array serves both.
    """
    prog = mat.progress_dir(out)
    path = prog / "out_pos.npy"
    if not path.is_file():  # workers may race here: identical content, atomic replace
        order = np.load(prog / "order.npy")
        _save_npy(path, np.argsort(order, kind="stable").astype(np.int64))
    return np.load(path, mmap_mode="r")


def scatter_chunk(exp: tiledbsoma.Experiment, out: Path, plan: dict, c: int) -> int:
    """Read, validate and spill source chunk c; returns the number of cells spilled."""
    out, prog, opts = Path(out), mat.progress_dir(out), plan["options"]
    lo, hi = mat.block_range(plan, c)
    pos = np.asarray(_out_pos(out)[lo:hi], dtype=np.int64)
    ids = np.asarray(np.load(prog / "order.npy", mmap_mode="r")[pos], dtype=np.int64)
    var_all = np.load(prog / "var_all.npy")
    X = soma.read_csr(exp.ms[opts["measurement"]].X[opts["layer"]], ids, var_all)
    X, changed = check_counts(X, ids, opts["round_counts"])
    if changed:
        logger.warning("chunk %d: rounded/clipped %d count values (--round-counts)", c, changed)
    library = library_sizes(X, ids, plan["source"]["source"])
    keep = np.searchsorted(var_all, np.load(prog / "var_keep.npy"))
    if keep.size != var_all.size:
        X = X[:, keep]
    X.sort_indices()
    rank = np.argsort(pos, kind="stable")  # spill rows in output order: blocks are slices
    X, pos = X[rank], pos[rank]
    cells = np.empty(pos.size, CELL_DTYPE)
    cells["pos"], cells["start"] = pos, X.indptr[:-1]
    cells["library"], cells["nnz"] = library[rank], np.diff(X.indptr)
    vals = np.empty(X.nnz, VAL_DTYPE)
    vals["col"], vals["val"] = X.indices, X.data
    bs = opts["block_cells"]
    blocks = np.searchsorted(pos, np.arange(plan["n_blocks"] + 1, dtype=np.int64) * bs)
    obs = mat.source_obs(exp, plan, ids).take(pa.array(rank))
    mat.spill_dir(out).mkdir(parents=True, exist_ok=True)
    _save_npy(_chunk_file(out, c, "cells.npy"), cells)
    _save_npy(_chunk_file(out, c, "vals.npy"), vals)
    _save_npy(_chunk_file(out, c, "blocks.npy"), blocks.astype(np.int64))
    _save_npy(_chunk_file(out, c, "rowstats.npy"), _row_stats(X.indptr[blocks], X.data))
    path = _chunk_file(out, c, "obs.arrow")
    with pa.OSFile(str(_tmp(path)), "wb") as sink, pa.ipc.new_file(sink, obs.schema) as w:
        w.write_table(obs)
    os.replace(_tmp(path), path)
    (mat.spill_dir(out) / f"scatter_{c:06d}.done").touch()
    return int(pos.size)


def _row_stats(block_starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[stored counts per output block..., largest count] of one chunk (int64).

    Validated counts are integers, so int64 holds the largest exactly.
    """
    largest = int(counts.max()) if counts.size else 0
    return np.append(np.diff(block_starts).astype(np.int64), np.int64(largest))


def row_stats(out: Path, plan: dict) -> tuple[np.ndarray, int]:
    """(stored counts per output block, largest count) over every scattered chunk.

    Reads n_blocks small files of n_blocks + 1 values (6,000 blocks at 100M cells: 300 MB), not
    the counts themselves.
    """
    n = plan["n_blocks"]
    block_nnz, largest = np.zeros(n, dtype=np.int64), 0
    for c in range(n):
        stats = _chunk_row_stats(out, c)
        block_nnz += stats[:-1]
        largest = max(largest, int(stats[-1]))
    return block_nnz, largest


def _chunk_row_stats(out: Path, c: int) -> np.ndarray:
    """A chunk's rowstats.npy; derived once from its cells and counts if spilled without it."""
    path = _chunk_file(out, c, "rowstats.npy")
    if not path.is_file():
        cells = np.load(_chunk_file(out, c, "cells.npy"))
        starts = np.zeros(cells.size + 1, dtype=np.int64)
        np.cumsum(cells["nnz"], out=starts[1:])  # counts are spilled cell after cell
        vals = np.empty(0, VAL_DTYPE)
        if starts[-1]:  # numpy cannot memory-map an empty array
            vals = np.load(_chunk_file(out, c, "vals.npy"), mmap_mode="r")
        blocks = np.load(_chunk_file(out, c, "blocks.npy"))
        _save_npy(path, _row_stats(starts[blocks], vals["val"]))
    return np.load(path)


def _chunk_piece(out: Path, c: int, b: int) -> tuple[np.ndarray, np.ndarray, pa.Table] | None:
    """(cells, vals, obs) of output block b held by chunk c, or None if it holds none."""
    blocks = np.load(_chunk_file(out, c, "blocks.npy"), mmap_mode="r")
    a, z = int(blocks[b]), int(blocks[b + 1])
    if a == z:
        return None
    cells = np.array(np.load(_chunk_file(out, c, "cells.npy"), mmap_mode="r")[a:z])
    v0, v1 = int(cells["start"][0]), int(cells["start"][-1] + cells["nnz"][-1])
    vals = np.empty(0, VAL_DTYPE)
    if v1 > v0:  # numpy cannot memory-map an empty array
        vals = np.array(np.load(_chunk_file(out, c, "vals.npy"), mmap_mode="r")[v0:v1])
    source = pa.memory_map(str(_chunk_file(out, c, "obs.arrow")))
    obs = pa.ipc.open_file(source).read_all().slice(a, z - a)
    return cells, vals, obs


def gather_block(out: Path, plan: dict, b: int, rows=None) -> int:
    """Assemble output block b from the spill and write it; returns the number of cells.

    `rows`: a `rowstore.RowWriter` that also gets the block's rows, or None.
    """
    out = Path(out)
    lo, hi = mat.block_range(plan, b)
    parts = [p for c in range(plan["n_blocks"]) if (p := _chunk_piece(out, c, b)) is not None]
    cells = np.concatenate([p[0] for p in parts])
    vals = np.concatenate([p[1] for p in parts])
    rank = np.argsort(cells["pos"], kind="stable")
    if not np.array_equal(cells["pos"][rank], np.arange(lo, hi)):
        raise RuntimeError(f"block {b}: spill holds the wrong cells; delete .progress and rerun")
    indptr = np.zeros(cells.size + 1, dtype=np.int64)
    np.cumsum(cells["nnz"], out=indptr[1:])
    shape = (cells.size, plan["n_genes"])
    X = sp.csr_matrix((vals["val"], vals["col"], indptr), shape=shape)[rank]
    obs = pa.concat_tables([p[2] for p in parts]).take(pa.array(rank))
    return mat.write_block(out, plan, b, X, cells["library"][rank], obs, rows)

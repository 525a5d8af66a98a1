"""TileDB-SOMA access: contexts, opening experiments (local, S3, Census) and reading X and obs.

Opening names what failed in one line (`IngestError`): a path or URI that holds no experiment,
a Census that cannot be reached without network access (with how to use a local copy instead).

The ingest reads whole rows as scipy CSR (`read_csr`) and obs tables (`read_obs`, `query_obs`);
the stream reads rows as raw COO (`read_rows`, mapped to local rows by `local_rows`) and obs in
bounded joinid ranges (`obs_ranges`); the row store fills blocks from X with `read_coo`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma

from atlasldm.data.validate import IngestError

logger = logging.getLogger(__name__)

# Bounded read memory of the ingest; users override any key with tiledb_config. Measured on a
# 16,384-cell random read of a Census-layout array (31M values): 7.3 GB peak RSS with the library
# defaults, 2.1 GB with these, at the same speed.
INGEST_TILEDB_CONFIG: dict[str, Any] = {
    "py.init_buffer_bytes": 128 * 1024**2,
    "soma.init_buffer_bytes": 128 * 1024**2,
    "sm.mem.total_budget": 2 * 1024**3,
}
# TileDB settings of the stream (docs/loader_profile.md). Result buffers: tiledbsoma's 1 GiB
# default is allocated per read and per thread, which costs more than a small read itself; 16 MiB
# per column stays under glibc's largest mmap threshold (32 MiB), so freed buffers are reused
# from the heap instead of being mapped and page-faulted afresh by every read (larger results
# arrive in several tables). No malloc_trim per query: TileDB's default hands the freed tile
# and result buffers back to the OS after every query, and the next query faults them in again;
# at 100,000 cells that zeroing and faulting was a third of direct mode's CPU.
STREAM_TILEDB_CONFIG = {
    "soma.init_buffer_bytes": str(16 * 1024**2),
    "sm.mem.malloc_trim": "false",
}
OBS_RANGE = 1 << 19  # obs joinids per read of `obs_ranges`
# Where the public Census lives; named in the hint for a local copy (`aws s3 sync` of it).
CENSUS_BUCKET = "s3://cellxgene-census-public-us-west-2/cell-census"
CENSUS_ORGANISM = "homo_sapiens"  # experiment of a `census[:VERSION]` source in direct mode


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def census_offline(source: str, err: BaseException, local_fix: str) -> IngestError:
    """The one-line error for a Census that cannot be reached; `local_fix` says where a local
    copy goes (`--census-uri DIR` for ingest, `data.source=DIR/...` for direct mode)."""
    return IngestError(
        f"{source}: the CELLxGENE Census needs network access, which failed "
        f"({type(err).__name__}); connect to the internet, or use a local copy: "
        f"aws s3 sync --no-sign-request {CENSUS_BUCKET}/<VERSION>/soma/ DIR, then {local_fix}"
    )


def is_census(source: str) -> bool:
    """Whether a source string names the CELLxGENE Census (`census` or `census:VERSION`)."""
    return source == "census" or source.startswith("census:")


@functools.lru_cache(maxsize=8)  # every stream of a rank asks; one lookup per process
def resolve_census(source: str, organism: str = CENSUS_ORGANISM) -> tuple[str, dict[str, str]]:
    """(experiment URI, TileDB settings to read it) of `census[:VERSION]`, via cellxgene_census.

    Needs network access (the Census release directory); without it, or for an unknown
    version, raises IngestError with one line.
    """
    import cellxgene_census
    import requests

    version = source.partition(":")[2] or "stable"
    local_fix = f"set data.source=DIR/census_data/{organism}"
    try:
        locator = cellxgene_census.get_census_version_description(version)["soma"]
        if locator.get("relative_uri"):  # newer directories: a path under the chosen mirror
            mirrors = cellxgene_census.get_census_mirror_directory()
            mirror = mirrors[mirrors["default"]]
            root = f"{mirror['base_uri'].rstrip('/')}/{locator['relative_uri'].lstrip('/')}"
            region = mirror.get("region")
        else:
            root, region = locator["uri"], locator.get("s3_region")
    except (requests.RequestException, OSError) as err:
        raise census_offline(source, err, local_fix) from None
    except ValueError:
        raise IngestError(
            f"{source}: no such Census version; give census:stable, census:latest or a release "
            "date (cellxgene_census.get_census_version_directory() lists them)"
        ) from None
    config = {"vfs.s3.no_sign_request": "true", **({"vfs.s3.region": region} if region else {})}
    return f"{root.rstrip('/')}/census_data/{organism}", config


def make_context(tiledb_config: dict[str, Any] | None = None) -> tiledbsoma.SOMATileDBContext:
    """Return the ingest's SOMATileDBContext: INGEST_TILEDB_CONFIG overridden by tiledb_config."""
    cfg = dict(INGEST_TILEDB_CONFIG, **(tiledb_config or {}))
    return tiledbsoma.SOMATileDBContext(tiledb_config=cfg)


def stream_context(tiledb_config: dict[str, str]) -> tiledbsoma.SOMATileDBContext:
    """Return a stream's SOMATileDBContext (one per stream, shared by its reader threads)."""
    return tiledbsoma.SOMATileDBContext(tiledb_config={**STREAM_TILEDB_CONFIG, **tiledb_config})


def open_experiment(
    uri: str, context: tiledbsoma.SOMATileDBContext | None = None
) -> tiledbsoma.Experiment:
    """Open a SOMA Experiment (local path or s3:// URI) for reading; IngestError names the URI."""
    try:
        return tiledbsoma.Experiment.open(uri, mode="r", context=context or make_context())
    except tiledbsoma.DoesNotExistError:  # its message ("Group does not exist") has no path
        raise no_experiment(uri) from None
    except tiledbsoma.SOMAError as err:  # another kind of SOMA object, S3 unreachable, ...
        raise IngestError(
            f"{uri}: cannot open it as a SOMA experiment ({first_line(err)})"
        ) from None


def no_experiment(uri: str) -> IngestError:
    """The error for a path or URI that holds no SOMA object (it says which of the two)."""
    if "://" not in uri and Path(uri).exists():
        return IngestError(f"{uri} is not a SOMA experiment (no TileDB group there)")
    return IngestError(f"{uri} does not exist; give the path or URI of a SOMA experiment")


def open_census_experiment(
    organism: str,
    census_version: str | None = None,
    uri: str | None = None,
    tiledb_config: dict[str, Any] | None = None,
) -> tuple[Any, tiledbsoma.Experiment]:
    """Open the Census and return (census collection, census_data[organism] experiment).

    `uri` (local folder or S3) takes precedence over `census_version`, as in
    `cellxgene_census.open_soma`. The caller closes the collection.
    """
    census = _open_census(census_version, uri, tiledb_config)
    data = census["census_data"]
    if organism not in data:
        census.close()
        raise IngestError(
            f"organism {organism!r} not in this Census; available: {sorted(data.keys())}; "
            "fix --organism"
        )
    return census, data[organism]


def _open_census(version: str | None, uri: str | None, tiledb_config: dict[str, Any] | None):
    """`cellxgene_census.open_soma`, with its failures (network, version, URI) as one line."""
    import cellxgene_census  # imported lazily: only the census source needs it
    import requests

    source = f"--census-uri {uri}" if uri is not None else f"census:{version or 'stable'}"
    kwargs: dict[str, Any] = {"uri": uri} if uri is not None else {"census_version": version}
    if uri is None and version is None:
        kwargs["census_version"] = "stable"
    try:
        return cellxgene_census.open_soma(**kwargs, tiledb_config=tiledb_config)
    except (requests.RequestException, OSError) as err:
        raise census_offline(source, err, "pass --census-uri DIR") from None
    except tiledbsoma.DoesNotExistError:
        raise IngestError(
            f"{source} does not exist; give the Census folder that holds census_data/"
        ) from None
    except (ValueError, tiledbsoma.SOMAError) as err:  # unknown version; S3 unreachable
        raise IngestError(f"{source}: cannot open the Census ({first_line(err)})") from None


def var_table(exp: tiledbsoma.Experiment, measurement: str = "RNA") -> pa.Table:
    """The measurement's var table (all columns), sorted by soma_joinid."""
    tbl = exp.ms[measurement].var.read().concat()
    return tbl.sort_by("soma_joinid")


def read_csr(
    X: tiledbsoma.SparseNDArray, obs_ids: np.ndarray, var_ids: np.ndarray
) -> sp.csr_matrix:
    """Read rows obs_ids over all genes into CSR.

    Args:
        X: the SOMA sparse matrix (e.g. `exp.ms["RNA"].X["raw"]`).
        obs_ids: strictly increasing int64 obs soma_joinids; row i of the result is obs_ids[i].
        var_ids: strictly increasing int64 var soma_joinids; column j is var_ids[j].

    Returns:
        float32 CSR of shape (len(obs_ids), len(var_ids)); duplicates are summed. Peak memory
        is about 40 bytes per stored value (Arrow result + positions + CSR).
    """
    obs_ids = np.asarray(obs_ids, dtype=np.int64)
    var_ids = np.asarray(var_ids, dtype=np.int64)
    if obs_ids.size and np.any(np.diff(obs_ids) <= 0):
        raise ValueError("read_csr: obs_ids must be strictly increasing (sort them first)")
    rows, cols, vals = [], [], []
    if obs_ids.size:
        for tbl in X.read(coords=(_obs_coord(obs_ids),)).tables():
            d0 = tbl.column("soma_dim_0").to_numpy()
            d1 = tbl.column("soma_dim_1").to_numpy()
            # int32 positions: a read is far below 2**31 rows/genes and this halves memory.
            rows.append(np.searchsorted(obs_ids, d0).astype(np.int32))
            cols.append(np.searchsorted(var_ids, d1).astype(np.int32))
            vals.append(tbl.column("soma_data").to_numpy().astype(np.float32, copy=False))
    shape = (len(obs_ids), len(var_ids))
    if not rows:
        return sp.csr_matrix(shape, dtype=np.float32)
    r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    return sp.csr_matrix((v, (r, c)), shape=shape, dtype=np.float32)


def _obs_coord(obs_ids: np.ndarray) -> np.ndarray | slice:
    """Read coordinate for strictly increasing ids: a slice when they are one dense range.

    One range lets TileDB plan a single subarray instead of one range per cell.
    """
    if obs_ids.size and int(obs_ids[-1]) - int(obs_ids[0]) + 1 == obs_ids.size:
        return slice(int(obs_ids[0]), int(obs_ids[-1]))  # SOMA slices are inclusive
    return obs_ids


def read_obs(exp: tiledbsoma.Experiment, obs_ids: np.ndarray, columns: Sequence[str]) -> pa.Table:
    """Read obs columns for strictly increasing obs_ids, in that order (includes soma_joinid)."""
    cols = ["soma_joinid", *[c for c in columns if c != "soma_joinid"]]
    coord = _obs_coord(np.asarray(obs_ids, dtype=np.int64))
    tbl = exp.obs.read(coords=(coord,), column_names=cols).concat()
    tbl = tbl.sort_by("soma_joinid")
    if tbl.num_rows != len(obs_ids):
        raise ValueError(f"read_obs: asked for {len(obs_ids)} rows, got {tbl.num_rows}")
    return tbl


def query_obs(
    exp: tiledbsoma.Experiment, value_filter: str | None, columns: Sequence[str]
) -> pa.Table:
    """Read obs columns of the cells matching value_filter, sorted by soma_joinid."""
    cols = ["soma_joinid", *[c for c in columns if c != "soma_joinid"]]
    tbl = exp.obs.read(value_filter=value_filter, column_names=cols).concat()
    return tbl.sort_by("soma_joinid")


def read_coo(X: tiledbsoma.SparseNDArray, coords: slice | np.ndarray) -> tuple[np.ndarray, ...]:
    """Return (dim0 int64, dim1 int64, data float32) of X rows `coords`, in read order.

    result_order stays "auto": asking TileDB for row-major makes it sort every result, while
    csr_from_sorted_coo sorts only when needed. Arrow chunks are viewed zero-copy
    (`combine_chunks` copies even a single chunk).
    """
    names = ("soma_dim_0", "soma_dim_1", "soma_data")
    columns: list[list[np.ndarray]] = [[], [], []]
    for tbl in X.read(coords=(coords,)).tables():
        for out, name in zip(columns, names, strict=True):
            out.extend(chunk.to_numpy() for chunk in tbl.column(name).chunks if len(chunk))
    dtypes = (np.int64, np.int64, np.float32)
    return tuple(  # type: ignore[return-value]
        (parts[0] if len(parts) == 1 else np.concatenate(parts)) if parts else np.zeros(0, dt)
        for parts, dt in zip(columns, dtypes, strict=True)
    )


def read_rows(X: tiledbsoma.SparseNDArray, joinids: np.ndarray) -> tuple[np.ndarray, ...]:
    """Return (dim0, dim1, data) of the sorted `joinids`: one slice read when they are dense.

    A slice over [first, last] beats a point list when at least half of it is wanted (TileDB
    plans one range instead of one per row); rows of the slice that were not asked for (another
    split, a consumed part of a resumed round) are dropped.
    """
    lo, hi = int(joinids[0]), int(joinids[-1])
    if len(joinids) * 2 < hi - lo + 1:
        return read_coo(X, joinids)
    dim0, dim1, data = read_coo(X, slice(lo, hi))
    if len(joinids) != hi - lo + 1:
        wanted = np.zeros(hi - lo + 1, dtype=bool)
        wanted[joinids - lo] = True
        keep = wanted[dim0 - lo]
        dim0, dim1, data = dim0[keep], dim1[keep], data[keep]
    return dim0, dim1, data


def local_rows(dim0: np.ndarray, joinids: np.ndarray) -> np.ndarray:
    """Return the row index in sorted `joinids` of each entry's joinid (dense range: offset)."""
    if not len(joinids):
        return dim0
    span = int(joinids[-1] - joinids[0]) + 1
    if span == len(joinids):
        return dim0 - joinids[0]
    if span <= 64 * len(joinids):  # a lookup table is O(nnz); searchsorted is O(nnz log n)
        table = np.zeros(span, dtype=np.int64)
        table[joinids - joinids[0]] = np.arange(len(joinids))
        return table[dim0 - joinids[0]]
    return np.searchsorted(joinids, dim0)


def obs_domain(obs: tiledbsoma.DataFrame) -> tuple[int, int]:
    """(first, last) joinid written in obs; (0, -1) when it is empty."""
    domain = obs.non_empty_domain()
    if not domain or domain[0] is None or domain[0][0] is None:
        return 0, -1
    return int(domain[0][0]), int(domain[0][1])


def obs_ranges(
    obs: tiledbsoma.DataFrame, columns: list[str], value_filter: str | None
) -> Iterator[pa.Table]:
    """Yield the filtered obs as one table per range of OBS_RANGE joinids, ascending.

    One unbounded read returns a single table whose TileDB buffers grow with the corpus (about
    110 B per cell); bounded joinid ranges keep that to one range whatever the corpus size.
    """
    lo, hi = obs_domain(obs)
    for start in range(lo, hi + 1, OBS_RANGE):
        coords = (slice(start, min(start + OBS_RANGE, hi + 1) - 1),)
        yield obs.read(coords=coords, value_filter=value_filter, column_names=columns).concat()

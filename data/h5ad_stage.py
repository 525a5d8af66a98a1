"""Staging of h5ad inputs into one SOMA experiment, keyed by what the input files hold.

The staged experiment is reused only while every input has the size, mtime and sha256 recorded
when it was staged (`input_key`): a file fixed in place after a failed ingest, or changed after
a crash, is staged again rather than read from the stale copy. Unreadable files (truncated,
not HDF5, no cells or genes) are refused with one line before anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from atlasldm.data.validate import IngestError, check_feature_ids
from atlasldm.data.vocab import atomic_write_text
from atlasldm.progress import Progress

logger = logging.getLogger(__name__)

HASH_CHUNK = 8 << 20


def input_key(paths: Sequence[str]) -> list[dict]:
    """[{path, size, mtime_ns, sha256}] of the input files, in order."""
    key = []
    for path in paths:
        stat = Path(path).stat()
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                digest.update(chunk)
        key.append(
            {
                "path": str(path),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "sha256": digest.hexdigest(),
            }
        )
    return key


def _marker(uri: str) -> Path:
    return Path(uri + ".complete.json")


def staged_record(paths: Sequence[str], layer: str | None) -> dict:
    """What the completion marker of a staging of `paths` holds."""
    return {"paths": list(paths), "layer": layer, "inputs": input_key(paths)}


def changed_inputs(paths: Sequence[str], uri: str) -> list[str]:
    """Inputs whose size, mtime or content differ from the staging at uri (all if unknown)."""
    marker = _marker(uri)
    recorded = json.loads(marker.read_text()).get("inputs") if marker.is_file() else None
    if not recorded:  # no staging, or staged before inputs were recorded
        return list(paths)
    old = {rec["path"]: rec for rec in recorded}
    return [new["path"] for new in input_key(paths) if old.get(new["path"]) != new]


def stage_h5ads(paths: Sequence[str], uri: str, layer: str | None = None) -> str:
    """Register and append h5ad files into one SOMA experiment at uri (reused when current).

    Counts come from `layers[layer]` if given, else `.raw.X` if present, else `.X`. feature_id is
    var["feature_id"] if present, else the var index; dataset_id defaults to the file stem.
    Memory: one file at a time is loaded (registration reads obs/var only).
    """
    import tiledbsoma.io

    record = staged_record(paths, layer)
    marker = _marker(uri)
    if marker.is_file() and json.loads(marker.read_text()) == record:
        return uri
    metas = [_h5ad_counts(p, layer, i, len(paths), with_x=False) for i, p in enumerate(paths)]
    if Path(uri).exists():  # checked every input above: only now is the old staging dropped
        shutil.rmtree(uri)
    marker.unlink(missing_ok=True)
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    # The experiment must exist before registration: create its schema from the first file.
    first = _h5ad_counts(paths[0], layer, 0, len(paths), with_x=True)
    tiledbsoma.io.from_anndata(
        uri, first, measurement_name="RNA", X_layer_name="raw", ingest_mode="schema_only"
    )
    del first
    rd = tiledbsoma.io.register_anndatas(
        uri, metas, measurement_name="RNA", obs_field_name="obs_id", var_field_name="var_id"
    )
    rd.prepare_experiment(uri)
    cells = sum(meta.n_obs for meta in metas)
    progress = Progress("ingest stage h5ad", cells, "cells") if _shows_info() else None
    for i, path in enumerate(paths):
        adata = _h5ad_counts(path, layer, i, len(paths), with_x=True)
        tiledbsoma.io.from_anndata(
            uri, adata, measurement_name="RNA", X_layer_name="raw", registration_mapping=rd
        )
        logger.info("staged %s (%d cells)", path, adata.n_obs)
        if progress is not None:
            progress.update(adata.n_obs)
    if progress is not None:  # closed on success only: a refused file ends with its error line
        progress.close()
    atomic_write_text(marker, json.dumps(record))
    return uri


def _shows_info() -> bool:
    """Whether progress is shown: the log level lets INFO through (not --log-level WARNING)."""
    return logger.isEnabledFor(logging.INFO)


@contextlib.contextmanager
def _readable(path: str) -> Iterator[None]:
    """Turn the errors of a damaged h5ad into one IngestError naming the file."""
    try:
        yield
    except IngestError:
        raise
    # h5py raises OSError for a truncated or non-HDF5 file; anndata raises KeyError, ValueError,
    # TypeError or NotImplementedError for missing or malformed groups.
    except (OSError, KeyError, ValueError, TypeError, NotImplementedError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise IngestError(
            f"{path} is not a readable h5ad file ({type(err).__name__}: {reason}); it may be "
            "truncated or damaged: export or download it again, or remove it from --source"
        ) from None


def _h5ad_counts(path: str, layer: str | None, index: int, n_files: int, with_x: bool):
    """AnnData with counts in X (or no X), Census-named obs/var; validates the file."""
    import anndata as ad

    with _readable(path):
        src = ad.read_h5ad(path, backed="r")
        try:
            return _counts_of(src, path, layer, index, n_files, with_x)
        finally:
            src.file.close()


def _counts_of(src, path: str, layer: str | None, index: int, n_files: int, with_x: bool):
    """_h5ad_counts on an opened (backed) AnnData."""
    import anndata as ad
    import scipy.sparse as sp

    use_raw = layer is None and src.raw is not None
    var_src = src.raw.var if use_raw else src.var
    if src.n_obs == 0 or len(var_src) == 0:
        raise IngestError(
            f"{path} holds {src.n_obs} cells x {len(var_src)} genes; a training copy needs "
            "both: remove the file from --source or export it with its cells and genes"
        )
    ids = var_src["feature_id"] if "feature_id" in var_src.columns else var_src.index
    ids = check_feature_ids(list(ids), f"{path} var")
    names = var_src["feature_name"].astype(str).tolist() if "feature_name" in var_src else ids
    var = ad.AnnData(var=var_src.copy()).var
    var.index = ids
    var.index.name = "var_id"
    var["feature_id"], var["feature_name"] = ids, names
    obs = src.obs.copy()
    if "dataset_id" not in obs.columns:
        obs["dataset_id"] = Path(path).stem
        logger.info("%s: no dataset_id column; using the file stem", path)
    # Obs ids must be unique across files for registration; prefix them when there are several.
    obs.index = [f"{index}:{x}" if n_files > 1 else str(x) for x in obs.index]
    obs.index.name = "obs_id"
    if not with_x:
        return ad.AnnData(obs=obs, var=var)
    if layer is not None:
        if layer not in src.layers:
            raise IngestError(f"{path}: layer {layer!r} not found; layers: {list(src.layers)}")
        X = src.layers[layer]
    else:
        X = src.raw.X if use_raw else src.X
    X = sp.csr_matrix(X[:] if hasattr(X, "shape") else X, dtype=np.float32)
    return ad.AnnData(X=X, obs=obs, var=var)

"""The evaluation's input files, read and checked before anything is computed or written.

A user's mistake (a path that does not exist, a label column the files lack, a file without
cells, genes that do not match the real data, normalised values given as counts) raises
`InputError` with one line that names the file, the problem and the fix; the command prints it
as `error: ...` and exits with code 2, leaving no report folder behind.
"""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

SHOWN = 8  # names listed in a message before it says how many more there are
NAME = re.compile(r"[A-Za-z0-9_.-]+")  # set names become parts of figure file names
COUNT_CHECK_ROWS = 2000  # rows checked for integer counts: normalised data fails on any row


class InputError(ValueError):
    """A bad input of the evaluation; the message is one line naming the problem and the fix."""


def listing(names: list | np.ndarray | object) -> str:
    """Return `a, b, c` for up to SHOWN names, then `... (N in all)`."""
    names = [str(n) for n in names]  # type: ignore[union-attr]
    if not names:
        return "none"
    shown = ", ".join(names[:SHOWN])
    return shown if len(names) <= SHOWN else f"{shown}, ... ({len(names)} in all)"


def _soma(path: str | Path, what: str) -> ad.AnnData:
    """Return a SOMA Experiment's cells: measurement RNA (else the first), X layer `counts`
    (generated) or `raw` (Census, training copies), else the first; var indexed by feature_id."""
    import tiledbsoma
    import tiledbsoma.io

    try:
        exp = tiledbsoma.Experiment.open(str(path))
    except Exception as exc:  # tiledbsoma raises several types for a missing/foreign folder
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        inner = Path(str(path)) / "experiment"  # a training copy holds its Experiment there
        fix = f"give {inner}" if inner.is_dir() else "give one of them"
        raise InputError(
            f"{what} {path} is neither an .h5ad file nor a SOMA Experiment ({reason}); {fix}"
        ) from None
    with exp:
        ms = "RNA" if "RNA" in exp.ms else next(iter(exp.ms))
        layers = list(exp.ms[ms].X)
        layer = next((name for name in ("counts", "raw") if name in layers), layers[0])
        obs_id = "obs_id" if "obs_id" in exp.obs.schema.names else None
        return tiledbsoma.io.to_anndata(
            exp,
            measurement_name=ms,
            X_layer_name=layer,
            obs_id_name=obs_id,
            var_id_name="feature_id",
        )


def read_cells(path: str | Path, what: str = "input") -> ad.AnnData:
    """Return the cells of an .h5ad file or a SOMA Experiment (folder or URI) as AnnData.

    `what` names the input in messages (an option, e.g. `--real-test`). A local path that does
    not exist, or an .h5ad file that is not one, raises InputError.
    """
    text = str(path)
    if "://" not in text and not Path(text).exists():
        raise InputError(
            f"{what} {path} does not exist; give an .h5ad file or a SOMA Experiment folder"
        )
    if not text.endswith(".h5ad"):
        return _soma(path, what)
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise OSError, KeyError, ... for a damaged file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{what} {path} is not a readable .h5ad file ({reason})") from None


def require_cells(adata: ad.AnnData, what: str) -> None:
    """Raise InputError when `adata` has no cells or no genes."""
    if adata.n_obs == 0:
        raise InputError(f"{what} has no cells; give a file with cells")
    if adata.n_vars == 0:
        raise InputError(f"{what} has no genes (var is empty); give a file with genes")


def require_label(adata: ad.AnnData, key: str, what: str, fix: str) -> None:
    """Raise InputError when obs has no column `key`, listing the columns it has."""
    if key not in adata.obs.columns:
        columns = listing(list(adata.obs.columns))
        raise InputError(f"{what} has no obs column {key!r} (its columns: {columns}); {fix}")


def require_counts(adata: ad.AnnData, what: str, fix: str) -> None:
    """Raise InputError when X holds negative or non-integer values (not raw counts).

    Only the first COUNT_CHECK_ROWS cells are read: normalised values show on any row.
    """
    x = adata.X[:COUNT_CHECK_ROWS]
    values = x.data if sp.issparse(x) else np.asarray(x).ravel()
    values = np.asarray(values, dtype=np.float64)
    bad = values[(values < 0) | (values != np.round(values)) | ~np.isfinite(values)]
    if bad.size:
        raise InputError(f"{what} X is not raw counts (it holds {bad[0]:.6g}); {fix}")


def require_shared_genes(reference: ad.AnnData, sets: dict[str, ad.AnnData], n_pcs: int) -> None:
    """Raise InputError when an input shares too few genes with the real training cells.

    `sets` maps each input's description to its cells. The protocol keeps the genes all inputs
    share: a set indexed by other ids (0, 1, 2, ... or symbols against Ensembl ids) shares
    none, and fewer genes than PCs leave no PCA to fit.
    """
    ref_genes = set(reference.var_names)
    for what, adata in sets.items():
        shared = len(ref_genes.intersection(adata.var_names))
        if shared == 0:
            raise InputError(
                f"{what} shares no gene id with the real training cells (its var_names: "
                f"{listing(list(adata.var_names[:3]))}, ...; real: "
                f"{listing(list(reference.var_names[:3]))}, ...); index var by the same gene ids"
            )
    common = ref_genes.intersection(*(set(a.var_names) for a in sets.values()))
    if len(common) < n_pcs:
        raise InputError(
            f"the inputs have {len(common)} genes in common, fewer than --n-pcs {n_pcs}; "
            "give files over the same genes, or lower --n-pcs"
        )


def parse_named(specs: list[str], option: str, reserved: tuple[str, ...] = ()) -> dict[str, str]:
    """Return name -> path from `NAME=PATH` specs.

    A malformed spec, a name repeated or reserved (`reserved`: names the report gives its own
    sets), or one that cannot be part of a file name raises InputError.
    """
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(
                f"{option} expects NAME=PATH, got {spec!r}; e.g. {option} scldm=gen.h5ad"
            )
        if not NAME.fullmatch(name):
            raise InputError(f"{option} name {name!r}: use letters, digits, '_', '.' and '-' only")
        if name in out:
            raise InputError(f"{option} names {name!r} twice; give each set its own name")
        if name in reserved:
            raise InputError(
                f"{option} name {name!r} is taken by the report's own sets ({listing(reserved)}); "
                "choose another name"
            )
        out[name] = path
    return out

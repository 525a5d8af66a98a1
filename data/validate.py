"""Input validation for ingest: gene ids, obs columns and count values.

Every failure raises `IngestError` (a ValueError) whose message names the problem, an example and
the fix, so a user can act on it without reading the code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from atlasldm.data import vocab

logger = logging.getLogger(__name__)


class IngestError(ValueError):
    """An input cannot be turned into a training copy; the message says why and how to fix it."""


def check_feature_ids(feature_ids: Sequence[object], where: str) -> list[str]:
    """Return feature ids as strings; raise IngestError on missing/empty or duplicate ids."""
    return vocab.check_feature_ids(feature_ids, where, IngestError)


def select_genes(var: pa.Table, genes: list[str] | None) -> pa.Table:
    """Validated var rows to keep (source order); errors name bad or unknown ids."""
    if "feature_id" not in var.column_names:
        raise IngestError(
            f"source var has no feature_id column (columns: {var.column_names}); "
            "store unique gene ids (Ensembl) in var['feature_id']"
        )
    if genes is not None:
        ids = [str(x) for x in var.column("feature_id").to_pylist()]
        wanted = set(genes)
        unknown = sorted(wanted - set(ids))
        if unknown:
            raise IngestError(
                f"{len(unknown)} ids of the gene list are not in the source var, e.g. "
                f"{unknown[:5]}; fix the --genes file"
            )
        var = var.filter(pa.array([x in wanted for x in ids]))
    check_feature_ids(var.column("feature_id").to_pylist(), "source var")
    return var


def check_obs_columns(requested: Sequence[str], available: Sequence[str], where: str) -> None:
    """Raise IngestError if a requested obs column is not in the source, listing what exists."""
    missing = [c for c in requested if c not in available]
    if missing:
        raise IngestError(
            f"{where}: requested obs column(s) {missing} not found; available columns: "
            f"{sorted(available)}. Fix --obs-columns/--conditions"
        )


def check_counts(
    X: sp.csr_matrix, source_joinids: np.ndarray, round_counts: bool
) -> tuple[sp.csr_matrix, int]:
    """Validate raw counts of one block; optionally round them.

    Args:
        X: float32 CSR block (cells x genes), rows aligned with source_joinids.
        source_joinids: source soma_joinid of each row, used to name an example cell.
        round_counts: round to the nearest integer and clip negatives to 0 instead of failing.

    Returns:
        (CSR without explicit zeros, number of stored values changed by rounding).
    """
    data = X.data
    nan = np.isnan(data) | np.isinf(data)
    if nan.any():
        cell = _example_cell(X, np.flatnonzero(nan)[0], source_joinids)
        raise IngestError(
            f"{int(nan.sum())} count values are NaN or infinite (e.g. in source cell soma_joinid="
            f"{cell}); raw counts must be finite: fix the source matrix (--round-counts cannot)"
        )
    bad = (data < 0) | (data != np.round(data))
    n_bad = int(bad.sum())
    if n_bad and not round_counts:
        first = np.flatnonzero(bad)[0]
        cell = _example_cell(X, first, source_joinids)
        kind = "negative" if data[first] < 0 else "non-integer"
        raise IngestError(
            f"{n_bad} count values are negative or non-integer (e.g. {kind} value "
            f"{float(data[first])!r} in source cell soma_joinid={cell}); the model needs raw "
            "integer UMI counts: point the source at raw counts (e.g. .raw.X or --layer) or pass "
            "--round-counts to round to the nearest integer and clip negatives to 0"
        )
    if n_bad:
        X.data = np.clip(np.round(data), 0, None).astype(np.float32)
    X.eliminate_zeros()
    return X, n_bad


def library_sizes(X: sp.csr_matrix, source_joinids: np.ndarray, source: str) -> np.ndarray:
    """float32 row sums of validated counts; IngestError when one overflows float32.

    Counts near float32's maximum (3.4e38) are finite one by one, but their sum is not, and an
    infinite library size would poison every loss that divides by it.
    """
    with np.errstate(over="ignore"):  # an overflow is reported below, as one line
        library = np.asarray(X.sum(axis=1), dtype=np.float64).ravel().astype(np.float32)
    too_big = ~np.isfinite(library)
    if too_big.any():
        row = int(np.flatnonzero(too_big)[0])
        total = float(X[row].sum(dtype=np.float64))
        raise IngestError(
            f"{source}: {int(too_big.sum())} cells have counts summing beyond float32's range "
            f"(e.g. source cell soma_joinid={int(source_joinids[row])}, sum {total:.3g}); raw "
            "UMI counts are far smaller: fix the source matrix (are they scaled or corrupt?)"
        )
    return library


def _example_cell(X: sp.csr_matrix, value_index: int, source_joinids: np.ndarray) -> int:
    """Source joinid of the row holding stored value number value_index."""
    row = int(np.searchsorted(X.indptr, value_index, side="right") - 1)
    return int(source_joinids[row])

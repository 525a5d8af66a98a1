"""Check a configured data source before anything reads it.

A training launcher reads the copy's `genes.tsv` to size the model before the stream opens the
copy, so a wrong `data.source` used to surface as a traceback from whichever file was read
first, once per rank. Here every case gets one line that names the source and the fix.

Where sources may live (docs/contracts.md §1.2): a training copy is a folder on a POSIX
filesystem (its side arrays and row store are read with positional file reads, and the ingest
locks and renames files); object stores (`s3://`) and the CELLxGENE Census (`census[:VERSION]`)
are read only in direct mode, through TileDB.
"""

from __future__ import annotations

from pathlib import Path

import tiledbsoma

from atlasldm.data.config import is_h5ad
from atlasldm.data.materialize import open_copy_manifest
from atlasldm.data.soma import is_census, resolve_census
from atlasldm.data.validate import IngestError
from atlasldm.data.vocab import GeneVocab

INGEST_CMD = "python -m atlasldm.data.ingest"
INGEST = f"{INGEST_CMD} --source <h5ad | SOMA experiment | builtin:pbmc68k> --out"


class DataSourceError(ValueError):
    """The configured data source cannot be used; the message names it and the fix."""


def _is_uri(source: str) -> bool:
    return "://" in source  # s3://, tiledb://: checked by TileDB when opened


def check_copy_location(source: str) -> None:
    """Raise DataSourceError unless `source` can hold a training copy (a filesystem path)."""
    if is_census(source):
        raise DataSourceError(
            f"data.source={source} is the CELLxGENE Census, which is read in data.mode=direct "
            f"(with data.vocab_path); or make a training copy of it: {INGEST_CMD} --source "
            f"{source} --out COPY"
        )
    if _is_uri(source):
        raise DataSourceError(
            f"data.source={source}: a training copy must be a folder on a POSIX filesystem (local "
            "disk, NFS, Lustre, ...), as its side arrays and row store are read with file reads; "
            "copy it to one (e.g. aws s3 sync), or read a SOMA experiment there in direct mode "
            "(data.mode=direct)"
        )


def check_source(source: str, mode: str, vocab_path: str = "") -> None:
    """Raise DataSourceError (one line) unless `source` can be opened in `mode`."""
    if not source:
        return
    if mode != "direct":
        check_copy_location(source)
    elif is_census(source) or _is_uri(source):  # read through TileDB, errors name the URI
        _check_vocab(vocab_path)
        if is_census(source):
            census_uri(source)  # needs network: one clear line before any stream opens
        return
    path = Path(source)
    if not path.exists():
        raise DataSourceError(
            f"data.source={source} does not exist; give a training copy ({INGEST} FOLDER) "
            "or a SOMA experiment with data.mode=direct"
        )
    if mode == "direct" and path.is_file() and is_h5ad(source):
        _check_vocab(vocab_path)  # the file itself is checked when it opens (one line)
        return
    if not path.is_dir():
        raise DataSourceError(
            f"data.source={source} is a file, not a folder; give a training-copy folder "
            f"({INGEST} FOLDER), or a SOMA experiment or .h5ad file with data.mode=direct"
        )
    if mode == "direct":
        _check_direct(source, vocab_path)
    else:
        _check_copy(path)


def _check_copy(path: Path) -> None:
    if not any(path.iterdir()):
        raise DataSourceError(f"data.source={path} is an empty folder; make one: {INGEST} {path}")
    if not (path / "manifest.json").is_file() and tiledbsoma.Experiment.exists(str(path)):
        raise DataSourceError(
            f"data.source={path} is a SOMA experiment, not a training copy; set data.mode=direct "
            f"and data.vocab_path=<genes.tsv>, or make a copy: {INGEST} COPY"
        )
    open_copy_manifest(path)  # incomplete or damaged copies: IngestError, one line
    if not (path / "genes.tsv").is_file():
        raise DataSourceError(
            f"training copy {path} has no genes.tsv (damaged); rebuild it: {INGEST} {path}"
        )


def _check_direct(source: str, vocab_path: str) -> None:
    if not tiledbsoma.Experiment.exists(source):
        raise DataSourceError(
            f"data.source={source} is not a SOMA experiment (data.mode=direct); give one, or a "
            "training copy with data.mode=copy"
        )
    _check_vocab(vocab_path)


def _check_vocab(vocab_path: str) -> None:
    """Direct mode's gene vocabulary: a genes.tsv or a plain gene list that reads cleanly."""
    if not vocab_path or not Path(vocab_path).is_file():
        raise DataSourceError(
            f"data.vocab_path={vocab_path or '(empty)'} is not a file; direct mode needs the "
            "model's genes: a genes.tsv (e.g. a training copy's) or a text file with one gene id "
            "per line"
        )
    try:
        GeneVocab.read(vocab_path)
    except ValueError as err:
        raise DataSourceError(f"data.vocab_path={vocab_path}: {err}") from None


def census_uri(source: str) -> tuple[str, dict[str, str]]:
    """`soma.resolve_census` of a direct-mode source, its failures as DataSourceError."""
    try:
        return resolve_census(source)
    except IngestError as err:
        raise DataSourceError(f"data.source={err}") from None

"""Check a configured data source before anything reads it.

A training launcher reads the copy's `genes.tsv` to size the model before the stream opens the
copy, so a wrong `data.source` used to surface as a traceback from whichever file was read
first, once per rank. Here every case gets one line that names the source and the fix.
"""

from __future__ import annotations

from pathlib import Path

import tiledbsoma

from atlasldm.data.materialize import open_copy_manifest

INGEST = "python -m atlasldm.data.ingest --source <h5ad | SOMA experiment | builtin:pbmc68k> --out"


class DataSourceError(ValueError):
    """The configured data source cannot be used; the message names it and the fix."""


def _is_uri(source: str) -> bool:
    return "://" in source  # s3://, tiledb://: checked by TileDB when opened


def check_source(source: str, mode: str, vocab_path: str = "") -> None:
    """Raise DataSourceError (one line) unless `source` can be opened in `mode`."""
    if not source or _is_uri(source):
        return
    path = Path(source)
    if not path.exists():
        raise DataSourceError(
            f"data.source={source} does not exist; give a training copy ({INGEST} FOLDER) "
            "or a SOMA experiment with data.mode=direct"
        )
    if not path.is_dir():
        raise DataSourceError(
            f"data.source={source} is a file, not a folder; give a training-copy folder "
            f"({INGEST} FOLDER) or a SOMA experiment with data.mode=direct"
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
    if not vocab_path or not Path(vocab_path).is_file():
        raise DataSourceError(
            f"data.vocab_path={vocab_path or '(empty)'} is not a file; direct mode needs a "
            "genes.tsv that defines the model's genes (for example a training copy's genes.tsv)"
        )

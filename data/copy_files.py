"""Sizes and checksums of a training copy's files, recorded in manifest.json and checked.

The manifest's `files` maps every file of a finished copy (side arrays, genes.tsv, labels.json,
every file of the TileDB experiment, and the row store) to `{size, sample, sha256}`:

- `sha256` hashes the whole file; `python -m atlasldm.data.verify COPY` checks it.
- `sample` hashes the file's size and SAMPLE_BLOCKS blocks of SAMPLE_BYTES (head, tail and
  evenly spaced ones between, the whole file when it is smaller). Opening a copy checks every
  size and every sample: cheap (a few hundred KB read per file) and it catches what damage
  usually looks like (a truncated, shifted, rewritten or foreign file), though not a flipped
  byte between samples, which only the full check finds.

Written by the ingest's finalize (before manifest.json, which is written last) and updated when
the row store is completed or rebuilt (it is written after the manifest). The copy's
`fingerprint` is not part of this: it identifies the data for resume and is computed as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from atlasldm.data.validate import IngestError
from atlasldm.data.vocab import atomic_write_text

log = logging.getLogger(__name__)

SAMPLE_BYTES = 1 << 16
SAMPLE_BLOCKS = 8
READ_BYTES = 8 << 20  # chunk of the full hash
CHECK_THREADS = 8
ROWS_PREFIX = "rows/"
MANIFEST = "manifest.json"


class CopyDamagedError(IngestError):
    """A training copy's file is missing, damaged or differs from its manifest record."""


def damaged(root: Path, what: str) -> CopyDamagedError:
    """The one-line error for a damaged file of the copy at root."""
    return CopyDamagedError(
        f"training copy {root} is damaged: {what}; rebuild the copy with the ingest command "
        f"(or restore the file from a backup); `python -m atlasldm.data.verify {root}` "
        "checks every file"
    )


def copy_files(root: Path) -> list[str]:
    """Relative paths of the copy's data files, sorted.

    Not the manifest itself, and no hidden entries: `.progress/`, `.staging/` and temporary
    files (`.name.<pid>`) are ingest state, not part of the copy.
    """
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            rel = Path(folder, name).relative_to(root).as_posix()
            if not name.startswith(".") and rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def sampling_recipe(block_bytes: int = SAMPLE_BYTES, blocks: int = SAMPLE_BLOCKS) -> dict:
    """How `sample` is computed; stored in the manifest, so records outlive new defaults."""
    return {"block_bytes": block_bytes, "blocks": blocks, "hash": "sha256"}


def sample_digest(path: Path, size: int, recipe: dict | None = None) -> str:
    """sha256 of the size and `blocks` fixed blocks of the file (all of it when small)."""
    recipe = recipe or sampling_recipe()
    block, blocks = int(recipe["block_bytes"]), int(recipe["blocks"])
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        fd = fh.fileno()
        if size <= blocks * block:
            digest.update(_read_exactly(fd, 0, size, path))
            return digest.hexdigest()
        last = size - block
        for i in range(blocks):  # offsets 0 .. last, evenly spaced: head and tail included
            digest.update(_read_exactly(fd, last * i // (blocks - 1), block, path))
    return digest.hexdigest()


def _read_exactly(fd: int, offset: int, length: int, path: Path) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:  # pread may return short counts; 0 means the file shrank
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise OSError(f"{path} ended at {offset + len(data)} bytes while being read")
        data += more
    return data


def stream_digest(path: Path, digest: Any) -> str:
    """Hex digest of the whole file, fed to the hashlib object `digest` in bounded reads."""
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def full_digest(path: Path) -> str:
    """sha256 of the whole file."""
    return stream_digest(path, hashlib.sha256())


def file_record(path: Path, recipe: dict | None = None) -> dict:
    """{size, sample, sha256} of one file."""
    size = path.stat().st_size
    sample = sample_digest(path, size, recipe)
    return {"size": size, "sample": sample, "sha256": full_digest(path)}


def record_files(root: Path, names: Iterable[str], recipe: dict | None = None) -> dict[str, dict]:
    """Records of the given relative paths of the copy."""
    return {rel: file_record(root / rel, recipe) for rel in names}


def non_row_files(root: Path) -> list[str]:
    """The copy's files outside the row store (recorded before manifest.json is written)."""
    return [rel for rel in copy_files(root) if not rel.startswith(ROWS_PREFIX)]


def record_row_store(root: Path) -> None:
    """Add the row store's records to manifest.json (atomic rewrite), replacing older ones.

    Copies whose manifest has no records (written before them) are left alone: recording only
    the row store would make a partial record look complete.
    """
    root = Path(root)
    manifest = json.loads((root / MANIFEST).read_text())
    if "files" not in manifest:
        return
    files = {k: v for k, v in manifest["files"].items() if not k.startswith(ROWS_PREFIX)}
    rows = [rel for rel in copy_files(root) if rel.startswith(ROWS_PREFIX)]
    files.update(record_files(root, rows, manifest.get("file_sample")))
    manifest["files"] = dict(sorted(files.items()))
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def record_all(root: Path, recipe: dict | None = None) -> dict:
    """Record every file of a finished copy into its manifest (`data.verify --record`)."""
    root, recipe = Path(root), recipe or sampling_recipe()
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["files"] = record_files(root, copy_files(root), recipe)
    manifest["file_sample"] = recipe
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def check_files(root: Path, manifest: dict, with_rows: bool, full: bool = False) -> int:
    """Check each recorded file's size, then its sample (or full hash); returns bytes covered.

    Row-store files are skipped unless `with_rows` (a store that is not used is not read).
    Files are checked on CHECK_THREADS threads: on a cold page cache the cost is the latency of
    about a thousand small reads, which overlap (pread and sha256 release the GIL). Raises
    CopyDamagedError naming the first file, in manifest order, that does not match.
    """
    records = [
        (rel, rec)
        for rel, rec in manifest["files"].items()
        if with_rows or not rel.startswith(ROWS_PREFIX)
    ]
    recipe = manifest.get("file_sample")
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        problems = list(pool.map(lambda item: _problem(root, *item, recipe, full), records))
    for problem in problems:
        if problem is not None:
            raise damaged(root, problem)
    return sum(rec["size"] for _, rec in records)


def _problem(root: Path, rel: str, rec: dict, recipe: dict | None, full: bool) -> str | None:
    """What is wrong with one recorded file, or None."""
    path = root / rel
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{rel} is missing"
    if size != rec["size"]:
        return f"{rel} has {size} bytes, the manifest records {rec['size']}"
    got = full_digest(path) if full else sample_digest(path, size, recipe)
    if got != rec["sha256" if full else "sample"]:
        kind = "checksum" if full else "sampled checksum"
        return f"{rel} does not match its manifest {kind} (its content changed)"
    return None


def rows_recorded(manifest: dict) -> bool:
    """Whether the manifest holds records of a row store."""
    return any(rel.startswith(ROWS_PREFIX) for rel in manifest.get("files", {}))

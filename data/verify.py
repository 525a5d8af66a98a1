"""Integrity checks of a training copy: a cheap one at open, a full one on demand.

    python -m atlasldm.data.verify COPY           # every recorded file: size and full sha256
    python -m atlasldm.data.verify COPY --quick   # what opening checks (sizes, sampled hashes)
    python -m atlasldm.data.verify COPY --record  # record checksums of an older copy

Opening a copy (`check_at_open`, called by the stream's CopySource) checks every recorded file's
size and sampled checksum (data/copy_files.py), then the structure that the reader relies on:
each side array is a valid .npy of n_cells values, labels.json is UTF-8 JSON, and a row store in
use has indptr of n_cells + 1 and genes/counts of its nnz. The structural part also protects
copies without records. Every failure is one CopyDamagedError line naming the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from atlasldm.data.copy_files import (
    CopyDamagedError,
    check_files,
    copy_files,
    damaged,
    record_all,
    rows_recorded,
)
from atlasldm.data.materialize import open_copy_manifest
from atlasldm.data.npy_reads import npy_header
from atlasldm.data.validate import IngestError

log = logging.getLogger(__name__)

SIDE_ARRAYS = ("library_size", "nnz", "source_joinid")


def read_json(root: Path, rel: str) -> object:
    """A JSON file of the copy; a missing, non-UTF-8 or truncated one is named."""
    path = root / rel
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise damaged(root, f"{rel} is missing") from None
    except UnicodeDecodeError as err:
        raise damaged(root, f"{rel} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise damaged(root, f"{rel} is not valid JSON ({err.msg}, line {err.lineno})") from None


def rows_in_use(root: Path, manifest: dict, row_store: str = "auto") -> bool:
    """Whether the reader will use the copy's row store (complete, of this copy, not off)."""
    if row_store == "off" or not (root / "rows" / "rows.json").is_file():
        return False
    meta = read_json(root, "rows/rows.json")
    return isinstance(meta, dict) and meta.get("copy_fingerprint") == manifest.get("fingerprint")


def check_npy(root: Path, rel: str, length: int) -> None:
    """A .npy of the copy holds a valid header, `length` values and exactly their bytes."""
    path = root / rel
    if not path.is_file():
        raise damaged(root, f"{rel} is missing")
    try:
        offset, dtype, shape = npy_header(path)
    except IngestError:
        raise damaged(root, f"{rel} is not a valid .npy file (garbage header)") from None
    if shape != (length,):
        raise damaged(root, f"{rel} holds shape {shape}, the copy needs ({length},)")
    expected = offset + length * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise damaged(root, f"{rel} has {size} bytes; its header needs {expected}")


def check_structure(root: Path, manifest: dict, with_rows: bool) -> None:
    """The shapes and encodings the reader relies on (see the module docstring)."""
    n_cells = int(manifest["n_cells"])
    side = sorted({*SIDE_ARRAYS, *(p.stem for p in (root / "side").glob("*.npy"))})
    for name in side:
        check_npy(root, f"side/{name}.npy", n_cells)
    read_json(root, "labels.json")
    if with_rows:
        meta = read_json(root, "rows/rows.json")
        nnz = int(meta["nnz"]) if isinstance(meta, dict) and "nnz" in meta else -1
        check_npy(root, "rows/indptr.npy", n_cells + 1)
        check_npy(root, "rows/genes.npy", nnz)
        check_npy(root, "rows/counts.npy", nnz)


def check_at_open(root: Path, manifest: dict, with_rows: bool) -> None:
    """The cheap check run when a copy is opened for training."""
    root = Path(root)
    if "files" not in manifest:
        log.warning(
            "%s has no recorded checksums (written before they existed), so damage is "
            "not detected; record them once: python -m atlasldm.data.verify %s --record",
            root,
            root,
        )
    else:
        check_files(root, manifest, with_rows)
        if with_rows and not rows_recorded(manifest):
            log.warning(
                "%s: the row store has no recorded checksums; record them: "
                "python -m atlasldm.data.verify %s --record",
                root,
                root,
            )
    check_structure(root, manifest, with_rows)


def verify(root: Path, quick: bool = False) -> tuple[int, int]:
    """Full (or open-time) check of a copy; returns (files checked, bytes covered)."""
    root = Path(root)
    manifest = open_copy_manifest(root)
    if "files" not in manifest:
        raise CopyDamagedError(
            f"{root} has no recorded checksums (written before they existed); record them "
            f"first: python -m atlasldm.data.verify {root} --record"
        )
    with_rows = rows_in_use(root, manifest)
    covered = check_files(root, manifest, with_rows, full=not quick)
    check_structure(root, manifest, with_rows)
    unrecorded = [] if quick else sorted(set(copy_files(root)) - set(manifest["files"]))
    if unrecorded:
        log.warning(
            "%s: %d files are not recorded (e.g. %s); they are not checked",
            root,
            len(unrecorded),
            unrecorded[:3],
        )
    checked = [r for r in manifest["files"] if with_rows or not r.startswith("rows/")]
    return len(checked), covered


def main(argv: list[str] | None = None) -> int:
    """Command entry point: 0 when the copy is intact, 1 with one line naming the damage."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("copy", type=Path)
    p.add_argument("--quick", action="store_true", help="only the open-time check")
    p.add_argument("--record", action="store_true", help="record checksums of every file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    start = time.perf_counter()
    try:
        if args.record:
            manifest = open_copy_manifest(args.copy)
            files = record_all(args.copy)["files"]
            print(
                f"{args.copy}: recorded {len(files)} files "
                f"(fingerprint {manifest['fingerprint'][:12]} unchanged)"
            )
            return 0
        n_files, covered = verify(args.copy, args.quick)
    except IngestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    kind = "open-time check" if args.quick else "full check"
    print(
        f"{args.copy}: {kind} ok, {n_files} files ({covered / 1e6:.1f} MB) in "
        f"{time.perf_counter() - start:.3f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The checkpoint folder on disk: the `latest` pointer, checksummed `COMPLETE` manifests, their
verification, and the choice of the tag to resume from.

`COMPLETE` (JSON, written last and atomically by rank 0) records the step, world size, ZeRO stage
and, for every file of the tag, its size and blake2b digest. A tag is used only when every file
matches. Markers written before checksums existed (no `files` key) still load, unverified.

With `checkpoint.resume=auto`, a `latest` that is empty, unreadable or names a tag that fails
verification does not restart the run from step 0 (that would overwrite the checkpoints): the
newest tag that verifies is taken instead, `latest` is repointed to it, and each tag that failed
is renamed `<tag>.corrupt-<UTC time>` (never deleted; no tag pattern matches it, so pruning
leaves it alone). A requeued job therefore resumes on its next try instead of failing every
time. When tags exist but none verifies, the run stops with one line and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from atlasldm.data.copy_files import stream_digest

COMPLETE = "COMPLETE"
LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d{7,})$")
CORRUPT_INFIX = ".corrupt-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message names the tag and the fix."""


def warn(message: str) -> None:
    """Print a loud one-line warning (callers run it on rank 0 only)."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via tmp file + fsync + os.replace, so readers see old or new."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_latest_raw(ckpt_dir: str | Path) -> tuple[str | None, str | None]:
    """Return (tag named by `latest`, None) or (None, what is wrong with it).

    (None, None) when there is no `latest` file at all (a run that never saved).
    """
    path = Path(ckpt_dir) / LATEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"'{path}' cannot be read ({exc.strerror})"
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        return None, f"'{path}' is empty"
    if not TAG_RE.match(text):
        return None, f"'{path}' holds no tag name ({len(raw)} bytes of something else)"
    return text, None


def read_latest(ckpt_dir: str | Path) -> str | None:
    """Return the tag in `ckpt_dir/latest`, or None when it is missing, empty or not a tag."""
    return read_latest_raw(ckpt_dir)[0]


def write_latest(ckpt_dir: str | Path, tag: str) -> None:
    """Point `ckpt_dir/latest` at `tag` atomically."""
    atomic_write_bytes(Path(ckpt_dir) / LATEST, tag.encode())


def file_digest(path: Path) -> str:
    """Return the blake2b hex digest of `path` (the digest `COMPLETE` records)."""
    return stream_digest(path, hashlib.blake2b(digest_size=32))


def folder_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Return {relative path: {size, blake2b}} of every file in a tag folder but `COMPLETE`.

    Hidden names (our `.x.tmp<pid>` files of an interrupted write) are not part of the tag.
    """
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != COMPLETE and not path.name.startswith("."):
            files[rel] = {"size": path.stat().st_size, "blake2b": file_digest(path)}
    return files


def write_complete(folder: Path, meta: dict[str, Any]) -> None:
    """Write the `COMPLETE` marker of `folder`: `meta` plus the checksums of every file."""
    record = dict(meta, files=folder_manifest(folder))
    atomic_write_bytes(folder / COMPLETE, json.dumps(record, indent=1).encode())


def read_complete(folder: Path) -> dict[str, Any]:
    """Return the parsed `COMPLETE` marker of `folder`.

    Raises:
        CheckpointError: it is missing or not the JSON object a save writes.
    """
    marker = folder / COMPLETE
    try:
        meta = json.loads(marker.read_bytes())
    except FileNotFoundError:
        missing = f"{folder.name} has no {COMPLETE} marker (its save did not finish)"
        raise CheckpointError(missing) from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{marker} is unreadable ({type(exc).__name__})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("world_size"), int):
        raise CheckpointError(f"{marker} is not a checkpoint marker (no world_size)")
    return meta


def tag_bytes(folder: Path) -> int:
    """Return the bytes of a complete tag (from its manifest, else by listing the folder)."""
    try:
        files = read_complete(folder).get("files")
    except CheckpointError:
        files = None
    if isinstance(files, dict):
        return sum(int(rec.get("size", 0)) for rec in files.values())
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def verify_tag(folder: Path) -> str | None:
    """Check every file of a tag against its `COMPLETE` manifest; return the problem or None.

    A marker without checksums (written before they existed) passes with a note on stderr.
    """
    try:
        meta = read_complete(folder)
    except CheckpointError as exc:
        return str(exc)
    files = meta.get("files")
    if files is None:
        warn(f"checkpoint {folder.name} predates checksums; loading it unverified")
        return None
    if not isinstance(files, dict):
        return f"{folder / COMPLETE} has a malformed file list"
    for rel, rec in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{folder.name}/{rel} is missing"
        size = path.stat().st_size
        if size != rec.get("size"):
            return f"{folder.name}/{rel} has {size} bytes, {COMPLETE} recorded {rec.get('size')}"
        if file_digest(path) != rec.get("blake2b"):
            return f"{folder.name}/{rel} does not match its checksum"
    return None


def complete_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """Return (step, tag) of every tag folder with a `COMPLETE` marker, oldest first."""
    tags = []
    for path in ckpt_dir.glob("step_*"):
        match = TAG_RE.match(path.name)
        if match and (path / COMPLETE).is_file():
            tags.append((int(match.group(1)), path.name))
    return sorted(tags)


def quarantine(ckpt_dir: Path, tag: str) -> Path:
    """Rename a corrupt tag to `<tag>.corrupt-<UTC time>` (kept for inspection); return it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = ckpt_dir / f"{tag}{CORRUPT_INFIX}{stamp}"
    suffix = 1
    while dest.exists():  # two quarantines of the same tag within a second
        dest = ckpt_dir / f"{tag}{CORRUPT_INFIX}{stamp}-{suffix}"
        suffix += 1
    os.replace(ckpt_dir / tag, dest)
    # A world-size conversion made from it would otherwise be reused for a later save of `tag`.
    shutil.rmtree(ckpt_dir / "universal" / tag, ignore_errors=True)
    return dest


def _candidates(ckpt_dir: Path, pointed: str | None) -> list[str]:
    # The tag `latest` names first, then every complete tag from the newest down. A complete tag
    # newer than `latest` is left out: a crash between COMPLETE and `latest` is the only way to
    # get one, and resuming from `latest` then is what the save promised.
    ceiling = int(TAG_RE.match(pointed).group(1)) if pointed else None
    older = [t for s, t in reversed(complete_tags(ckpt_dir)) if ceiling is None or s < ceiling]
    return ([pointed] if pointed else []) + older


def _nothing_verifies(ckpt_dir: Path, problems: list[str]) -> CheckpointError:
    return CheckpointError(
        f"no checkpoint in {ckpt_dir} verifies ({'; '.join(problems)}); nothing was "
        "overwritten. Restore a tag from a backup, or start afresh in a new run folder "
        "(or with checkpoint.resume=never, which overwrites these tags)"
    )


def select_auto_tag(ckpt_dir: Path) -> str | None:
    """Return the newest tag that verifies for `checkpoint.resume=auto` (rank 0 only).

    Quarantines each tag that fails and repoints `latest` when it changes its answer; returns
    None only when there is nothing to resume (no `latest` and no complete tag).

    Raises:
        CheckpointError: tags or a `latest` pointer exist, but no tag verifies.
    """
    pointed, pointer_problem = read_latest_raw(ckpt_dir)
    problems = [pointer_problem] if pointer_problem else []
    if pointed is None and pointer_problem is None and complete_tags(ckpt_dir):
        problems.append(f"'{ckpt_dir / LATEST}' is missing")
    if pointed is not None and not (ckpt_dir / pointed).is_dir():
        problems.append(f"'latest' names {pointed}, which does not exist")
        pointed = None
    for tag in _candidates(ckpt_dir, pointed):
        problem = verify_tag(ckpt_dir / tag)
        if problem is None:
            if problems:
                write_latest(ckpt_dir, tag)
                warn(f"resuming from {tag} instead: {'; '.join(problems)}")
            return tag
        moved = quarantine(ckpt_dir, tag)
        problems.append(f"{problem} (tag moved to {moved.name})")
        warn(f"checkpoint {tag} is corrupt: {problem}; moved it to {moved}")
    moved_aside = any(ckpt_dir.glob(f"step_*{CORRUPT_INFIX}*"))
    if problems or moved_aside or (ckpt_dir / LATEST).exists():
        raise _nothing_verifies(ckpt_dir, problems or ["'latest' names nothing"])
    return None


def check_explicit_tag(ckpt_dir: Path, tag: str) -> None:
    """Verify a tag named by `checkpoint.resume=<tag>` (nothing is moved: the user chose it).

    Raises:
        CheckpointError: it is missing, incomplete or corrupt; the message lists usable tags.
    """
    problem = verify_tag(ckpt_dir / tag) if (ckpt_dir / tag).is_dir() else "it does not exist"
    if problem is None:
        return
    known = [t for _, t in complete_tags(ckpt_dir)]
    raise CheckpointError(
        f"checkpoint {tag} in {ckpt_dir} cannot be used: {problem}; complete tags: "
        f"{known or 'none'}. Set checkpoint.resume to one of them, or checkpoint.resume=never "
        "to start afresh"
    )

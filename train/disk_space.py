"""Free-space checks and one-line messages for writes that fail (checkpoints, metrics, exports).

A full disk shows up in many shapes: `OSError(ENOSPC)` from plain writes, but torch's zip writer
reports it as a RuntimeError ("PytorchStreamWriter failed writing file", "unexpected pos ...")
and safetensors as its own error type. So a failed write is called a full disk when its errno
says so, or when the space left on the target filesystem is below what the write needed.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXT = ("no space left", "disk quota exceeded")
HEADROOM_FRACTION = 0.05  # on top of an estimate: sizes drift a little from save to save
HEADROOM_BYTES = 64 << 10  # and filesystem blocks, directory entries, temporary files


class OutputWriteError(RuntimeError):
    """A file the run must write (metrics, export) could not be written; names path and fix."""


def free_bytes(path: str | Path) -> int:
    """Return the bytes free for this user on the filesystem holding `path` (or its parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def with_headroom(nbytes: int) -> int:
    """Return the space to require for a write estimated at `nbytes`."""
    return int(nbytes * (1 + HEADROOM_FRACTION)) + HEADROOM_BYTES


def human(nbytes: float) -> str:
    """Return `nbytes` as a short size, e.g. `312 KiB` or `4.1 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit in ("B", "KiB") else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def is_disk_full(exc: BaseException, free: int, needed: int) -> bool:
    """True when `exc` (a failed write) means the filesystem ran out of space."""
    if getattr(exc, "errno", None) in _FULL_ERRNOS:
        return True
    text = str(exc).lower()
    return any(t in text for t in _FULL_TEXT) or free < needed


def one_line(exc: BaseException, limit: int = 300) -> str:
    """Return `Type: message` of `exc` on one line, cut to `limit` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_write_failure(what: str, path: Path, exc: BaseException, needed: int) -> str:
    """One line naming what failed, where, why, the space it needed and what to do."""
    free = free_bytes(path)
    if is_disk_full(exc, free, needed):
        why = f"the disk is full (needs about {human(needed)}, {human(free)} free)"
    else:
        why = one_line(exc)
    return f"{what} {path} failed: {why}; free disk space, then rerun the command to resume"


def append_line(path: Path, line: str) -> None:
    """Append `line` to `path`; on failure cut the file back, so no half line is left behind.

    Unbuffered, so a failed write is not retried (and half done) by a later flush or close.
    """
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError:
            os.ftruncate(fd, start)  # the next reader (a resumed run, a test) parses whole lines
            raise
    finally:
        os.close(fd)

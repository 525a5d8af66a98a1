"""Removal of what killed ingest processes leave in a finished training copy.

A kill can leave the scatter spill (`.progress/spill`, as large as the counts: it is deleted
right after manifest.json, so a kill between the two keeps it), temporary files named after
their writer's pid (`.<name>.<pid>[.npy|.npz]` in side/, rows/ and .progress/) and the folder
of an interrupted row-store build (`.rows.tmp<pid>`). None of them is ever read again, and a
rerun uses new names, so they would stay forever: the ingest removes them once the copy is
finished (and again on `--resume` of a finished copy).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

from atlasldm.data.materialize import progress_dir, spill_dir
from atlasldm.data.rowstore import remove_interrupted_builds, row_store_dir

log = logging.getLogger(__name__)

PID_TEMP = re.compile(r"^\..+\.(\d+)(\.npy|\.npz)?$")
MKSTEMP_TEMP = re.compile(r"^\..+\.tmp$")  # atomic_write_text's temporaries: no pid in the name
MKSTEMP_AGE_S = 600.0  # such a file this old has no live writer (they live for milliseconds)


def remove_leftovers(out: str | os.PathLike) -> None:
    """Delete the spill, dead writers' temporaries and interrupted row-store builds of out."""
    out = Path(out)
    spill = spill_dir(out)
    if spill.exists():
        log.info("removing the scatter spill %s (the copy is finished)", spill)
        shutil.rmtree(spill, ignore_errors=True)
    for folder in (out, out / "side", row_store_dir(out), progress_dir(out)):
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_file() and _is_stale_temp(path):
                    log.info("removing %s, left by a killed writer", path)
                    path.unlink(missing_ok=True)
    remove_interrupted_builds(out)


def _is_stale_temp(path: Path) -> bool:
    """A temporary file whose writer is gone (dead pid, or an old pid-less temporary)."""
    match = PID_TEMP.match(path.name)
    if match:
        return not _alive(int(match.group(1)))
    if MKSTEMP_TEMP.match(path.name):
        return time.time() - path.stat().st_mtime > MKSTEMP_AGE_S
    return False


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True

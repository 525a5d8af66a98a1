"""DeepSpeed's per-rank shared-memory allreduce buffers in /dev/shm: names, owners, cleanup.

DeepSpeed's CPU comm op (shm.cpp) creates one buffer per rank (~69 MB of RAM each), named from
the user id, MASTER_ADDR, MASTER_PORT and the rank, and never unlinks it. A rank that exits
normally unlinks its own (`train.distributed` registers that at exit); a killed one cannot, so
every start removes the buffers whose owner process is gone (`remove_stale_buffers`).

Ownership: before DeepSpeed creates a buffer, its rank writes an owner record beside it
(`atlasldm_shm_owner_<buffer name>`: the PID and the process start time, which tells a reused
PID apart). A buffer is stale when its record names a process that is gone. A buffer without a
record (a job of an older version or another program) is stale only when no process maps it
and it is older than `UNRECORDED_GRACE_S` (a starting job maps its buffer right after creating
it). Only this user's buffers are ever considered; another user's are never touched.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path

SHM_DIR = Path("/dev/shm")
BUFFER_PREFIX = "deepspeed_allreduce_buffer"  # SHM_BUFFER_NAME in DeepSpeed's shm.cpp
OWNER_PREFIX = "atlasldm_shm_owner_"
UNRECORDED_GRACE_S = 60.0


def buffer_path(env: Mapping[str, str] | None = None, shm_dir: Path = SHM_DIR) -> Path:
    """This rank's buffer, named as shm.cpp names it: prefix_uid_MASTER_ADDR_MASTER_PORT_RANK."""
    env = os.environ if env is None else env
    name = f"{BUFFER_PREFIX}_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}"
    return shm_dir / f"{name}_{env['RANK']}"


def owner_record(buffer: Path) -> Path:
    """The file naming the process that owns `buffer`."""
    return buffer.with_name(OWNER_PREFIX + buffer.name)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    return stat.rsplit(")", 1)[1].split()[19]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def claim_buffer(buffer: Path) -> None:
    """Record this process as the owner of `buffer` (before DeepSpeed creates it)."""
    pid = os.getpid()
    _atomic_write(owner_record(buffer), f"{pid} {_start_time(pid) or ''}\n")


def release_buffer(buffer: Path) -> None:
    """Unlink `buffer` and its owner record (at exit: every collective has completed; peers
    that still map the buffer keep their mapping)."""
    buffer.unlink(missing_ok=True)
    owner_record(buffer).unlink(missing_ok=True)


def _is_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    # The PID exists; it is the recorded owner unless it was reused by a later process.
    now = _start_time(pid)
    return not start or now is None or now == start


def _owner_alive(record: Path) -> bool | None:
    """True/False when `record` names a live/gone process; None when there is no readable record."""
    try:
        fields = record.read_text().split()
    except FileNotFoundError:
        return None
    if not fields or not fields[0].isdigit():
        return None
    return _is_alive(int(fields[0]), fields[1] if len(fields) > 1 else "")


def _mapped_buffers() -> set[str]:
    """Paths of /dev/shm files that some process maps (those whose maps this user may read)."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            mapped.update(
                line.split(maxsplit=5)[5].strip()
                for line in maps.read_text().splitlines()
                if BUFFER_PREFIX in line
            )
    return mapped


def _is_stale(buffer: Path, mapped: set[str] | None) -> tuple[bool, set[str] | None]:
    """Return (whether `buffer` is stale, the mapped-paths set, computed at most once)."""
    alive = _owner_alive(owner_record(buffer))
    if alive is not None:
        return not alive, mapped
    try:
        age = time.time() - buffer.stat().st_mtime
    except FileNotFoundError:
        return False, mapped
    if age < UNRECORDED_GRACE_S:
        return False, mapped
    mapped = _mapped_buffers() if mapped is None else mapped
    return str(buffer) not in mapped, mapped


def job_prefix(buffer: Path) -> str:
    """The part of a buffer's name shared by all ranks of its job (everything but the rank)."""
    return buffer.name.rsplit("_", 1)[0] + "_"


def remove_stale_buffers(shm_dir: Path = SHM_DIR, own_job: str = "") -> list[Path]:
    """Unlink this user's buffers (and owner records) whose owner process is gone; return them.

    Buffers whose name starts with `own_job` (`job_prefix` of this job's buffer) are left alone:
    only one live job can hold a MASTER_ADDR:MASTER_PORT, so they are this job's ranks' (a peer
    may be creating one right now) or a dead job's that this job's ranks reuse and unlink at exit.
    """
    uid = os.getuid()
    removed: list[Path] = []
    mapped: set[str] | None = None
    for buffer in sorted(shm_dir.glob(f"{BUFFER_PREFIX}_{uid}_*")):
        if own_job and buffer.name.startswith(own_job):
            continue
        with contextlib.suppress(FileNotFoundError):
            if buffer.stat().st_uid != uid:
                continue
        stale, mapped = _is_stale(buffer, mapped)
        if stale:
            release_buffer(buffer)
            removed.append(buffer)
    # Records whose buffer is gone and whose owner is too (killed before DeepSpeed made one).
    for record in shm_dir.glob(f"{OWNER_PREFIX}{BUFFER_PREFIX}_{uid}_*"):
        buffer = record.with_name(record.name[len(OWNER_PREFIX) :])
        if not buffer.exists() and _owner_alive(record) is False:
            record.unlink(missing_ok=True)
    return removed

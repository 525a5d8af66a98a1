"""Killed DeepSpeed CPU jobs leave their shared-memory buffers in /dev/shm; a new job removes
those of dead jobs at start and keeps those of live ones.

Real jobs: `tests/faults/shm_job.py` under the deepspeed launcher (2 ranks, the launcher sets
LOCAL_SIZE, so DeepSpeed's CPU comm op maps one ~69 MB buffer per rank). One job is killed with
SIGKILL (launcher and ranks), one keeps running, then a third job starts and exits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atlasldm.train.shm_buffers import BUFFER_PREFIX, SHM_DIR, owner_record, release_buffer

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "tests" / "faults" / "shm_job.py"

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(folder: Path, hold: bool) -> subprocess.Popen:
    """Start a 2-rank job in its own process group; it reports its buffers under `folder`."""
    folder.mkdir()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    cmd += ["--master_port", str(_free_port()), str(JOB), str(folder), *(["hold"] if hold else [])]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1")
    log = open(folder / "log.txt", "w")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _buffers(folder: Path, proc: subprocess.Popen, timeout: float = 300) -> list[Path]:
    """Wait until both ranks reported their buffer; return the buffer paths."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reports = [folder / f"rank{r}" for r in (0, 1)]
        if all(p.is_file() for p in reports):
            return [Path(p.read_text()) for p in reports]
        assert proc.poll() is None, (folder / "log.txt").read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"job did not start in {timeout} s: " + (folder / "log.txt").read_text())


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its ranks (their process group): no atexit handler runs."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_new_job_removes_buffers_of_killed_jobs_and_keeps_live_ones(tmp_path):
    killed = _start(tmp_path / "killed", hold=True)
    live = _start(tmp_path / "live", hold=True)
    # Another user's buffer (their uid in the name), long unused, no owner record: never ours.
    other = SHM_DIR / f"{BUFFER_PREFIX}_{os.getuid() + 4242}_127.0.0.1_{_free_port()}_0"
    other.write_bytes(b"x")
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    leftovers = [other]
    try:
        killed_buffers = _buffers(tmp_path / "killed", killed)
        live_buffers = _buffers(tmp_path / "live", live)
        leftovers += killed_buffers + live_buffers
        _kill(killed)
        # The fault is real: a killed job leaves its buffers behind.
        assert all(b.is_file() for b in killed_buffers)

        fresh = _start(tmp_path / "fresh", hold=False)
        fresh_buffers = _buffers(tmp_path / "fresh", fresh)
        leftovers += fresh_buffers
        assert fresh.wait(timeout=300) == 0, (tmp_path / "fresh" / "log.txt").read_text()
        log = (tmp_path / "fresh" / "log.txt").read_text()

        assert not any(b.exists() for b in killed_buffers)
        assert all(b.is_file() for b in live_buffers)
        assert live.poll() is None  # the live job still runs
        assert other.is_file()
        assert "stale DeepSpeed buffer(s) of dead jobs" in log
        assert not any(owner_record(b).exists() for b in killed_buffers)
        assert all(owner_record(b).is_file() for b in live_buffers)
        assert not any(b.exists() or owner_record(b).exists() for b in fresh_buffers)  # atexit
    finally:
        for proc in (killed, live):
            if proc.poll() is None:
                _kill(proc)
        for buffer in leftovers:
            release_buffer(buffer)


def test_unrecorded_buffer_is_removed_only_when_unmapped_and_old(tmp_path):
    """Buffers left by a version without owner records: removed when no process maps them and
    they are past the grace period; a mapped one (a live job's) stays."""
    from atlasldm.train.shm_buffers import UNRECORDED_GRACE_S, job_prefix, remove_stale_buffers

    old = time.time() - 2 * UNRECORDED_GRACE_S
    port = _free_port()
    names = [f"{BUFFER_PREFIX}_{os.getuid()}_127.0.0.1_{port}_{r}" for r in range(3)]
    orphan, mapped, young = (SHM_DIR / n for n in names)
    for path in (orphan, mapped, young):
        path.write_bytes(b"\0" * 4096)
    os.utime(orphan, (old, old))
    os.utime(mapped, (old, old))
    # A real other process maps `mapped` (as a live job's ranks map their buffers).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import mmap,sys,time\n"
            f"f=open({str(mapped)!r},'r+b'); m=mmap.mmap(f.fileno(),0); print(1,flush=True)\n"
            "time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "1"
        # A starting job never removes buffers of its own MASTER_ADDR:MASTER_PORT (its peers').
        assert orphan not in remove_stale_buffers(own_job=job_prefix(orphan))
        assert orphan.is_file()
        removed = remove_stale_buffers()
        assert orphan in removed and not orphan.exists()
        assert mapped.is_file() and young.is_file()
    finally:
        holder.kill()
        holder.wait()
        for path in (orphan, mapped, young):
            release_buffer(path)

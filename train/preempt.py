"""Preemption: SIGTERM or a dead launcher asks the loop to save and stop, within a deadline.

Three ways a run is told to stop, all ending in the same place (the loop saves a complete
checkpoint at the end of the current step and returns):

- SIGTERM to the rank (SLURM preemption and `scancel`, Kubernetes pod deletion, torchrun
  passing on the signal it got). The handler only sets a flag: saving inside the handler could
  interrupt a collective.
- The launcher above the rank dies. The `deepspeed` command (DeepSpeed's runner) installs no
  signal handler on a single node: a SIGTERM to it kills it and nothing reaches the ranks, and a
  SIGKILL to any launcher leaves the ranks orphaned. So each rank records its launcher
  processes at start (the chain of parents that are `deepspeed`, `torchrun`, ... processes) and
  a daemon thread checks them every second; the first one gone counts as a SIGTERM.
- Both at once (a signal to the whole process group), which is the common case.

Once a stop is requested, the rank has `checkpoint.preempt_timeout_s` seconds to finish the
save. A rank that cannot (a peer died, the disk hangs) prints one line and exits with
`PREEMPT_TIMEOUT_EXIT`, so the scheduler's SIGKILL never finds it mid-write; `latest` then still
names the previous complete checkpoint.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

PREEMPT_TIMEOUT_EXIT = 124  # exit status of a rank whose stop-save ran past the deadline
WATCH_INTERVAL_S = 1.0  # how often the launcher processes are checked
_POLL_S = 0.25  # how often the deadline thread looks at the clock and for the end of the run
# argv entries that identify a launcher process (module names after `-m`, or script names)
_LAUNCHER_MODULES = {
    "deepspeed.launcher.launch",
    "deepspeed.launcher.runner",
    "torch.distributed.run",
    "torch.distributed.launch",
    "accelerate.commands.launch",
}
_LAUNCHER_SCRIPTS = {"deepspeed", "torchrun", "accelerate"}


def _read_proc(pid: int, name: str) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # gone, or no /proc on this platform
        return None


def _stat_fields(pid: int) -> list[str] | None:
    # The command name (field 2) may contain spaces and parentheses; split after its last ')'.
    raw = _read_proc(pid, "stat")
    if raw is None:
        return None
    return raw[raw.rindex(b")") + 2 :].decode().split()


def process_identity(pid: int) -> tuple[int, str] | None:
    """Return (pid, start time) of a live process, or None when it has exited (zombies too).

    The start time tells a reused pid from the original process.
    """
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return None
    return pid, fields[19]


def _parent_pid(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else 0


def is_launcher(argv: list[str]) -> bool:
    """Return True when a command line is a DeepSpeed, torchrun or accelerate launcher."""
    return any(a in _LAUNCHER_MODULES or os.path.basename(a) in _LAUNCHER_SCRIPTS for a in argv)


def launcher_chain(pid: int | None = None) -> list[tuple[int, str]]:
    """Return the identities of the launcher processes directly above `pid` (default: this one).

    Walks up the parents while they are launchers: under `deepspeed` that is DeepSpeed's
    per-node `launch` process and then the `deepspeed` runner the operator started (the one a
    `kill` reaches); under torchrun it is torchrun. Empty for a plain `python script.py`.
    """
    chain = []
    parent = _parent_pid(os.getpid() if pid is None else pid)
    while parent > 1:
        raw = _read_proc(parent, "cmdline")
        identity = process_identity(parent)
        if raw is None or identity is None or not is_launcher(raw.decode().split("\0")):
            break
        chain.append(identity)
        parent = _parent_pid(parent)
    return chain


class Preemption:
    """Stop requests (SIGTERM, launcher gone) and the deadline on the save that follows."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.reason = ""  # what asked for the stop, for the log line
        self._requested = threading.Event()
        self._saved = threading.Event()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []

    def install(self) -> Preemption:
        """Install the SIGTERM handler and start the launcher watch and deadline threads.

        The threads end at interpreter exit (`close` runs from atexit): a daemon thread still
        alive when Python finalizes is killed by an unwinding pthread_exit, which aborts the
        process if C++ frames are involved ("terminate called without an active exception").
        """
        self.install_handler()
        chain = launcher_chain()
        if chain:
            self._threads.append(threading.Thread(target=self._watch, args=(chain,), daemon=True))
        self._threads.append(threading.Thread(target=self._deadline, daemon=True))
        for thread in self._threads:
            thread.start()
        atexit.register(self.close)
        return self

    def close(self) -> None:
        """Stop the watch and deadline threads and wait for them (no deadline applies after)."""
        self._closed.set()
        for thread in self._threads:
            thread.join(timeout=2 * WATCH_INTERVAL_S)

    def install_handler(self) -> Preemption:
        """Install only the SIGTERM handler (main thread): no launcher watch, no deadline."""
        signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def stop_requested(self) -> bool:
        """Return True once a stop was requested (read once per step by the loop)."""
        return self._requested.is_set()

    def request(self, reason: str) -> None:
        """Ask the loop to save and stop; the deadline starts now."""
        if not self._requested.is_set():
            self.reason = reason
            self._requested.set()

    def saved(self) -> None:
        """Report that the stop-save is complete: the deadline no longer applies."""
        self._saved.set()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.request("SIGTERM")

    def _watch(self, chain: list[tuple[int, str]]) -> None:
        while not (self._requested.is_set() or self._closed.is_set()):
            for pid, started in chain:
                if process_identity(pid) != (pid, started):
                    self.request(f"launcher process {pid} exited")
                    return
            self._closed.wait(WATCH_INTERVAL_S)

    def _deadline(self) -> None:
        while not self._requested.wait(_POLL_S):
            if self._closed.is_set():
                return
        end = time.monotonic() + self.timeout_s
        while not self._saved.wait(_POLL_S):
            if self._closed.is_set():
                return
            if time.monotonic() >= end:
                self._give_up()

    def _give_up(self) -> None:
        rank = os.environ.get("RANK", "0")
        sys.stderr.write(
            f"error: rank {rank} could not save its checkpoint within "
            f"checkpoint.preempt_timeout_s = {self.timeout_s:g} s after {self.reason}; exiting "
            "without it ('latest' still names the previous checkpoint). Raise "
            "checkpoint.preempt_timeout_s and the scheduler's grace period together\n"
        )
        sys.stderr.flush()
        os._exit(PREEMPT_TIMEOUT_EXIT)  # the main thread may be stuck in a collective


def install_preemption(timeout_s: float) -> Preemption:
    """Return an installed `Preemption` (call once per run, from the main thread)."""
    return Preemption(timeout_s).install()

"""Progress of long steps: a tqdm bar on a terminal, log lines with rate and ETA otherwise.

A bar redraws itself with carriage returns, which a log file (SLURM, nohup, a CI console) keeps
as one unreadable line or drops. When stderr is not a terminal, `Progress` prints instead one
line every `every_s` seconds and one at the end, e.g.

    ingest: 120,000/700,000 cells (17%), 4,810 cells/s, ETA 2:00

Every package may import this module (it imports nothing from the project).
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from tqdm import tqdm

LOG_EVERY_S = 30.0  # a log line per half minute: readable in a log, and shows a hang quickly


def _duration(seconds: float) -> str:
    """`72.3` -> `1:12`; `3725` -> `1:02:05`."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Count units of work; show them as a bar on a TTY or as periodic log lines otherwise.

    Use as a context manager: `with Progress("ingest", total=n, unit="cells") as p: p.update(k)`.
    `total=None` (unknown) prints counts and rates without a percentage or ETA.
    """

    def __init__(
        self,
        desc: str,
        total: float | None = None,
        unit: str = "it",
        stream: IO[str] | None = None,
        every_s: float = LOG_EVERY_S,
    ) -> None:
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0.0
        self._start = self._last = time.monotonic()
        self._bar: Any = None
        self._closed = False
        if self.stream.isatty():
            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=self.stream)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        """Add `n` finished units; print a line if `every_s` has passed since the last one."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(now)

    def close(self) -> None:
        """Finish: close the bar, or print the final line (always, so a log shows the end)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        else:
            self._print(time.monotonic(), final=True)

    def line(self, now: float, final: bool = False) -> str:
        """The log line for the state at time `now` (monotonic seconds)."""
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        count = f"{self.done:,.0f}" + (f"/{self.total:,.0f}" if self.total else "")
        text = f"{self.desc}: {count} {self.unit}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        text += f", {rate:,.1f} {self.unit}/s"
        if final:
            return text + f", done in {_duration(elapsed)}"
        if self.total and rate > 0:
            text += f", ETA {_duration((self.total - self.done) / rate)}"
        return text

    def _print(self, now: float, final: bool = False) -> None:
        print(self.line(now, final), file=self.stream, flush=True)

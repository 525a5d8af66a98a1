"""Progress of long steps: periodic log lines with rate and ETA when stderr is not a terminal."""

from __future__ import annotations

import io
import re

from atlasldm.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_lines_with_rate_and_eta_and_a_final_line(monkeypatch) -> None:
    clock = iter([0.0, 10.0, 31.0, 62.0, 70.0, 80.0])
    monkeypatch.setattr("atlasldm.progress.time.monotonic", lambda: next(clock))
    out = io.StringIO()
    with Progress("ingest", total=1000, unit="cells", stream=out, every_s=30) as p:
        p.update(100)  # t=10: under 30 s since the start, no line
        p.update(200)  # t=31: 300 cells in 31 s
        p.update(300)  # t=62: 600 cells in 62 s
        p.update(100)  # t=70: 8 s since the last line
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("ingest: 300/1,000 cells (30%), 9.7 cells/s, ETA 1:12")
    assert re.match(r"ingest: 600/1,000 cells \(60%\), 9\.7 cells/s, ETA 0:41", lines[1])
    assert lines[2] == "ingest: 700/1,000 cells (70%), 8.8 cells/s, done in 1:20"


def test_unknown_total_has_no_percentage_or_eta() -> None:
    out = io.StringIO()
    p = Progress("evaluate", unit="sets", stream=out, every_s=0)
    p.update(2)
    p.close()
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all("%" not in x and "ETA" not in x for x in lines)


def test_a_terminal_gets_a_bar_not_lines() -> None:
    out = FakeTerminal()
    with Progress("generate", total=10, unit="cells", stream=out, every_s=0) as p:
        p.update(10)
    assert "\r" in out.getvalue() and "ETA" not in out.getvalue()

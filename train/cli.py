"""Shared entry-point wrapper of the training launchers (train_vae, train_dit, train_classifier)."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from atlasldm.data.source_check import DataSourceError
from atlasldm.data.validate import IngestError
from atlasldm.train.checkpoint import CheckpointError
from atlasldm.train.config import ConfigError
from atlasldm.train.disk_space import OutputWriteError
from atlasldm.train.export import ExportError
from atlasldm.train.loop import TrainingError

# Raised identically on every rank before any collective: rank 0 alone says it, once.
SAME_ON_EVERY_RANK = (ConfigError, DataSourceError, IngestError)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn the project's known errors into exit 1 with one line (`error: ...`), no traceback."""
    try:
        yield
    except SAME_ON_EVERY_RANK as exc:
        if os.environ.get("RANK", "0") != "0":
            sys.exit(1)
        sys.exit(f"error: {exc}")
    except (CheckpointError, ExportError, OutputWriteError, TrainingError) as exc:
        sys.exit(f"error: {exc}")


def end_process(code: int = 0) -> NoReturn:
    """Exit with `code` once the run's work is done, skipping interpreter finalization.

    A 2-rank CPU run could abort after it had saved and exported everything ("terminate called
    without an active exception", exit -6): a gloo worker thread still releasing a finished
    all-reduce's tensors needs the GIL, and a thread that asks for it while Python finalizes is
    ended by pthread_exit, whose unwinding through C++ destructors calls std::terminate (seen in
    a core dump: ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> THPVariable_dealloc ->
    take_gil -> pthread_exit). Exit handlers (shared-memory cleanup, preemption threads, W&B) and
    the output streams run and flush first; only finalization is skipped.
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _exit_code(exc: SystemExit) -> int:
    """The status `sys.exit(arg)` would give, printing a message argument as Python does."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def run_stage(stage_main: Callable[[Sequence[str]], Any]) -> NoReturn:
    """Run a stage's `main(argv)` with the command-line arguments (`one_line_errors`), then end
    the process (`end_process`)."""
    try:
        with one_line_errors():
            stage_main(sys.argv[1:])
    except SystemExit as exc:
        end_process(_exit_code(exc))
    end_process(0)

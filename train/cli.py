"""Shared entry point of the training launchers (train_vae, train_dit, train_classifier) and
the export command: known errors as one line with exit code 2, and the process ending."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from atlasldm.cli_parser import Parser
from atlasldm.data.source_check import DataSourceError
from atlasldm.data.validate import IngestError
from atlasldm.train import classifier_stage, dit_stage, vae_stage
from atlasldm.train.checkpoint import CheckpointError
from atlasldm.train.config import ConfigError
from atlasldm.train.disk_space import OutputWriteError
from atlasldm.train.export import ExportError
from atlasldm.train.loop import TrainingError

# Raised identically on every rank before any collective: rank 0 alone says it, once.
SAME_ON_EVERY_RANK = (ConfigError, DataSourceError, IngestError)
USAGE_ERROR = 2  # a mistake in the command, config or data: argparse's usage-error code
RUN_FAILURE = 1  # a run that started and failed (NaN loss, full disk, damaged checkpoint)
SILENT_RANK_GRACE_S = 10.0  # how long a rank that says nothing waits for rank 0 to speak
# The stage a run folder's `stage` file names -> that stage's main (export_only=True exports).
EXPORT_STAGES = {"vae": vae_stage.main, "dit": dit_stage.main, "classifier": classifier_stage.main}


def fail(message: str, every_rank: bool = False, code: int = USAGE_ERROR) -> NoReturn:
    """Print `error: message` (on rank 0 only, unless `every_rank`) and exit with `code`.

    A launcher ends every rank as soon as one exits with an error, so a silent rank that exited
    first could kill rank 0 before it said why. The silent ranks wait (at most
    SILENT_RANK_GRACE_S) for rank 0 to speak and exit, which ends them.
    """
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(SILENT_RANK_GRACE_S)
    sys.exit(code)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn the project's known errors into one line (`error: ...`), no traceback.

    A mistake in the input (config, data source) exits 2 and is said once, by rank 0, as every
    rank raises it alike; a run that fails once started exits 1, from every rank that fails.
    """
    try:
        yield
    except SAME_ON_EVERY_RANK as exc:
        fail(str(exc))
    except (CheckpointError, ExportError, OutputWriteError, TrainingError) as exc:
        fail(str(exc), every_rank=True, code=RUN_FAILURE)


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


def run_stage(
    stage_main: Callable[[Sequence[str]], Any], argv: Sequence[str] | None = None
) -> NoReturn:
    """Run a stage's `main(argv)` (default argv: the command line) under `one_line_errors`,
    then end the process (`end_process`)."""
    try:
        with one_line_errors():
            stage_main(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        end_process(_exit_code(exc))
    end_process(0)


def export_parser() -> Parser:
    """The command line of `launchers/export.py` (`atlasldm export`)."""
    parser = Parser(
        description="Export a run's newest complete checkpoint to RUN_DIR/export/ (fp32 weights, "
        "EMA for the DiT,\nconfig.json, vocabularies, side files), using the run's saved "
        "config.yaml. The stage (vae, dit\nor classifier) is read from RUN_DIR/stage. Also runs "
        "under deepspeed/torchrun."
    )
    parser.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="run folder <run.root>/<run.name>"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of the run's config.yaml (e.g. precision.dtype=fp32)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the config the export would use and exit without exporting",
    )
    return parser


def export_main(argv: Sequence[str] | None = None) -> NoReturn:
    """Export the latest checkpoint of the run folder named in argv (default: the command line)."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local")]
    opts = export_parser().parse_mixed(args, rest="overrides")
    run_dir: Path = opts.run_dir
    stage_file = run_dir / "stage"
    if not stage_file.is_file():
        fail(f"{run_dir} is not a run folder (no 'stage' file); give RUN_DIR of a trained run")
    stage = stage_file.read_text().strip()
    if stage not in EXPORT_STAGES:
        known = ", ".join(EXPORT_STAGES)
        fail(f"{stage_file} names the unknown stage {stage!r} (known: {known}); fix that file")
    overrides = [f"run.root={run_dir.parent}", f"run.name={run_dir.name}", *opts.overrides]
    config = [str(run_dir / "config.yaml"), *overrides]
    config += ["--print-config"] if opts.print_config else []
    run_stage(lambda _argv: EXPORT_STAGES[stage](config, export_only=True))

"""Metric tracking: W&B and a tqdm bar on rank 0, stdout metric lines; a no-op elsewhere.

W&B runs offline by default (`logging.wandb_mode`; the `WANDB_MODE` environment variable wins).
The run id is stored in `run_dir/wandb_run_id` (and in the checkpoint's client state by the
loop), so a restarted job reopens the same W&B run with `resume="allow"`.

W&B is never allowed to stop or hang training: its service process dies first under a SIGTERM
to the whole job, its disk can fill, and online mode may have no network. An online start that
fails within `INIT_TIMEOUT_S` falls back to offline; any later W&B error prints one WARNING line
and turns W&B off for the rest of the run (metrics.jsonl and the stdout lines go on), and
finishing the W&B run waits at most `FINISH_TIMEOUT_S`.
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlasldm.train.config import LoggingConfig

_ID_FILE = "wandb_run_id"
INIT_TIMEOUT_S = 30.0  # bound on wandb.init (online mode without network retries for minutes)
FINISH_TIMEOUT_S = 30.0  # bound on finishing the W&B run (online: the upload may never end)
LOG_TIMEOUT_S = 5.0  # bound on one W&B log call, and on tearing W&B down after a failure


def _format(step: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}"] + [f"{k} {v:.6g}" for k, v in sorted(metrics.items())]
    return " | ".join(parts)


@dataclass
class RunInfo:
    """The run as the tracker records it: its folder, name, config and progress."""

    run_dir: Path  # holds `wandb_run_id` and W&B's own folder
    name: str  # the W&B run name
    config: dict[str, Any] | None = None  # the resolved config, logged to W&B
    run_id: str | None = None  # W&B run to reopen (else the one in `run_dir`, else a new one)
    total_steps: int | None = None  # length of the progress bar
    start_step: int = 0  # where the progress bar starts (a resumed run)


class Tracker:
    """Rank-0 tracker: W&B logging, stdout metric lines every N steps, tqdm with cells/s."""

    def __init__(self, cfg: LoggingConfig, info: RunInfo) -> None:
        self.cfg = cfg
        run_dir = Path(info.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / _ID_FILE
        run_id = info.run_id
        if run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        self.run_id = run_id or secrets.token_hex(4)
        id_file.write_text(self.run_id)
        self._wandb = self._init_wandb(run_dir, info)
        self._bar = None
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=info.total_steps, initial=info.start_step, unit="step", dynamic_ncols=True
            )
        self._last_time = time.perf_counter()

    @property
    def wandb_run(self) -> Any:
        """The W&B run metrics go to; None once W&B is off (disabled, failed or closed)."""
        return self._wandb

    @wandb_run.setter
    def wandb_run(self, run: Any) -> None:
        """Log to `run` (any object with W&B's `log` and `finish`) from now on."""
        self._wandb = run

    def _init_wandb(self, run_dir: Path, info: RunInfo) -> Any:
        mode = os.environ.get("WANDB_MODE", self.cfg.wandb_mode)
        if mode == "disabled":
            return None
        try:
            return self._start_wandb(mode, run_dir, info)
        except Exception as exc:  # W&B raises its own types (CommError, UsageError, ...)
            if mode != "online":
                _warn(f"W&B could not start ({_brief(exc)}); W&B is off for this run")
                return None
            first = exc
        import wandb

        # The failed online run still holds its id in W&B's service: start a fresh service.
        _call_with_timeout(wandb.teardown, FINISH_TIMEOUT_S)
        try:  # no network or no API key: keep the history locally for `wandb sync`
            run = self._start_wandb("offline", run_dir, info)
        except Exception as exc:
            _warn(f"W&B could not start online ({_brief(first)}) nor offline ({_brief(exc)})")
            return None
        _warn(
            f"W&B could not start online ({_brief(first)}); logging offline under "
            f"{run_dir / 'wandb'} instead (upload it later with `wandb sync`)"
        )
        return run

    def _start_wandb(self, mode: str, run_dir: Path, info: RunInfo) -> Any:
        import wandb  # slow import; only rank 0 with W&B enabled pays it

        return wandb.init(
            project=self.cfg.wandb_project,
            name=info.name,
            id=self.run_id,
            resume="allow",  # same id after a restart continues the same W&B run
            dir=str(run_dir),
            mode=mode,
            config=info.config,
            # W&B's own variable still wins, so an operator can wait longer for a slow network
            settings=wandb.Settings(
                init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S))
            ),
        )

    def log(self, metrics: dict[str, float], step: int, cells: int = 0) -> None:
        """Record `metrics` (already all-reduced) for optimiser `step`; `cells` since last call.

        The bar advances every call; W&B and the stdout line follow `logging.every_steps`.
        """
        now = time.perf_counter()
        rate = cells / max(now - self._last_time, 1e-9)
        self._last_time = now
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({"cells/s": f"{rate:.0f}"}, refresh=False)
        if self.cfg.every_steps <= 0 or step % self.cfg.every_steps:
            return
        metrics = dict(metrics, **{"perf/cells_per_s": rate})
        line = _format(step, metrics)
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)
        self.log_wandb(metrics, step)

    def log_wandb(self, metrics: dict[str, float], step: int) -> None:
        """Send `metrics` to W&B only (validation metrics); never raises."""
        if self._wandb is None:
            return
        # Bounded: a log call into a dying W&B service can block, and rank 0 stuck there would
        # miss the save deadline after a SIGTERM (seen once in CI: no warning, no checkpoint).
        run = self._wandb
        error = _call_with_timeout(lambda: run.log(metrics, step=step), LOG_TIMEOUT_S)
        if error:  # e.g. ConnectionResetError once the W&B service is gone
            self._give_up_wandb(f"W&B logging failed at step {step} ({error})")

    def close(self) -> None:
        """Close the bar and finish the W&B run (at most `FINISH_TIMEOUT_S`); never raises."""
        if self._bar is not None:
            self._bar.close()
        if self._wandb is None:
            return
        error = _call_with_timeout(self._wandb.finish, FINISH_TIMEOUT_S)
        if error:
            self._give_up_wandb(f"finishing the W&B run failed ({error})")
        self._wandb = None

    def _give_up_wandb(self, what: str) -> None:
        _warn(f"{what}; W&B is off for the rest of this run, metrics go on to metrics.jsonl")
        self._wandb = None
        # W&B's own exit hook would talk to the dead service again and print a traceback;
        # tearing down now unregisters that hook (its error is the one already reported).
        import wandb

        _call_with_timeout(wandb.teardown, LOG_TIMEOUT_S)  # short: a stop may be waiting


class NullTracker:
    """Tracker of non-zero ranks: every method does nothing."""

    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int, cells: int = 0) -> None:
        """Do nothing."""

    def log_wandb(self, metrics: dict[str, float], step: int) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""


def _brief(exc: BaseException) -> str:
    """Return `Type: first line of the message` (W&B messages run over many lines)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _call_with_timeout(fn: Any, timeout_s: float) -> str | None:
    """Run `fn()` in a daemon thread; return None on success, else what went wrong.

    A daemon thread, so a call that never returns cannot keep the process alive either.
    """
    errors: list[str] = []

    def target() -> None:
        try:
            fn()
        except Exception as exc:
            errors.append(_brief(exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return f"no answer within {timeout_s:g} s"
    return errors[0] if errors else None


def make_tracker(cfg: LoggingConfig, info: RunInfo) -> Tracker | NullTracker:
    """Return a `Tracker` on rank 0 and a `NullTracker` elsewhere."""
    from atlasldm.train.distributed import is_main  # keeps deepspeed out of a Tracker-only import

    return Tracker(cfg, info) if is_main() else NullTracker()

"""Metric tracking: W&B and a tqdm bar on rank 0, stdout metric lines; a no-op elsewhere.

W&B runs offline by default (`logging.wandb_mode`; the `WANDB_MODE` environment variable wins).
The run id is stored in `run_dir/wandb_run_id` (and in the checkpoint's client state by the
loop), so a restarted job reopens the same W&B run with `resume="allow"`.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

from train.config import LoggingConfig

_ID_FILE = "wandb_run_id"


def _format(step: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}"] + [f"{k} {v:.6g}" for k, v in sorted(metrics.items())]
    return " | ".join(parts)


class Tracker:
    """Rank-0 tracker: W&B logging, stdout metric lines every N steps, tqdm with cells/s."""

    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: str | Path,
        run_name: str,
        config: dict[str, Any] | None = None,
        run_id: str | None = None,
        total_steps: int | None = None,
        start_step: int = 0,
    ) -> None:
        self.cfg = cfg
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / _ID_FILE
        if run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        self.run_id = run_id or secrets.token_hex(4)
        id_file.write_text(self.run_id)
        self._wandb = self._init_wandb(run_dir, run_name, config)
        self._bar = None
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._last_time = time.perf_counter()

    def _init_wandb(self, run_dir: Path, run_name: str, config: dict | None) -> Any:
        mode = os.environ.get("WANDB_MODE", self.cfg.wandb_mode)
        if mode == "disabled":
            return None
        import wandb  # slow import; only rank 0 with W&B enabled pays it

        return wandb.init(
            project=self.cfg.wandb_project,
            name=run_name,
            id=self.run_id,
            resume="allow",  # same id after a restart continues the same W&B run
            dir=str(run_dir),
            mode=mode,
            config=config,
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
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        """Close the bar and finish the W&B run."""
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


class NullTracker:
    """Tracker of non-zero ranks: every method does nothing."""

    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int, cells: int = 0) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""


def make_tracker(cfg: LoggingConfig, run_dir: str | Path, run_name: str, **kwargs: Any) -> Any:
    """Return a `Tracker` on rank 0 and a `NullTracker` elsewhere (kwargs go to `Tracker`)."""
    from train.distributed import is_main

    return Tracker(cfg, run_dir, run_name, **kwargs) if is_main() else NullTracker()

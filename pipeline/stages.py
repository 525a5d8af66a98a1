"""Run the stages of a pipeline as subprocesses: each through its launcher, its output in a log,
its progress on the console (`StageWatch`), its wall time recorded (`Timer`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from tqdm import tqdm

from atlasldm.launchers import LAUNCHERS_DIR
from atlasldm.progress import Progress

POLL_S = 2.0  # how often a running stage's log and metrics are read
# Lines of a stage's log worth showing on the console: `Progress` lines (`ingest: 1,200/7,000
# cells (17%), 410.0 cells/s, ETA 0:14`) and validation results (`step 300 | val/nll 682.5 ...`).
ECHO = re.compile(
    r"step \d+ \| val/|[\w .:/-]+: [\d,.]+(/[\d,.]+)? [^,]+( \(\d+%\))?, [\d,.]+ \S+/s"
)


SCRIPTS = {"vae": "train_vae.py", "classifier": "train_classifier.py"}  # the rest: train_dit.py


def stage_script(stage: str) -> str:
    """The launcher that trains `stage` (vae, dit, skip_mlp, classifier)."""
    return SCRIPTS.get(stage, "train_dit.py")


def stage_args(recipe: Path, root: Path, stage: str, copy: Path) -> list[str]:
    """A training launcher's arguments: the recipe, run folder `root/stage` and, for the VAE,
    the training copy it reads (later stages find their data through the VAE run)."""
    args = [str(recipe), f"run.root={root}", f"run.name={stage}"]
    return args + ([f"data.source={copy}"] if stage == "vae" else [])


def step_args(steps: int) -> list[str]:
    """Overrides that train `steps` steps, validating and checkpointing once, at the end."""
    return [f"run.max_steps={steps}", f"run.eval_every={steps}", f"checkpoint.every_steps={steps}"]


def recipe_steps(recipe: Path) -> int | None:
    """`run.max_steps` of a recipe file (None when it leaves the stage default)."""
    tree = yaml.safe_load(recipe.read_text()) or {}
    return (tree.get("run") or {}).get("max_steps")


class Timer:
    """Wall time of each named step, printed as it ends."""

    def __init__(self) -> None:
        self.t0, self.steps = time.perf_counter(), {}

    def run(self, name: str, fn, *args, **kwargs):
        """Run fn(*args, **kwargs), record and print its wall time, return its result."""
        start = time.perf_counter()
        print(f"== {name} ...", flush=True)
        out = fn(*args, **kwargs)
        self.steps[name] = time.perf_counter() - start
        print(f"== {name}: {self.steps[name]:.0f} s", flush=True)
        return out

    @property
    def total(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.t0


def _new_lines(path: Path | None, offset: int) -> tuple[list[str], int]:
    """Return the whole lines `path` gained after byte `offset`, and the offset after them.

    A line still being written waits for the next call.
    """
    if path is None or not path.is_file():
        return [], offset
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    end = data.rfind(b"\n") + 1
    return data[:end].decode(errors="replace").splitlines(), offset + end


class StageWatch:
    """What the console shows of a stage running as a subprocess with its output in `log`.

    Echoes the log's progress and validation lines (`ECHO`); for a training stage, counts the
    optimiser steps its `run_dir/metrics.jsonl` gains against `max_steps` with `Progress`: a
    bar on a terminal, a line with the step reached, rate and ETA every half minute otherwise.
    The count starts at the first step logged, so the rate and ETA leave out the start-up.
    """

    def __init__(
        self, name: str, log: Path, run_dir: Path | None = None, max_steps: int | None = None
    ) -> None:
        self.name, self.max_steps = name, max_steps
        self.log, self.log_offset = log, 0
        self.metrics = run_dir / "metrics.jsonl" if run_dir is not None else None
        # A resumed run appends to its metrics: count only what this launch adds.
        self.metrics_offset = (
            self.metrics.stat().st_size if self.metrics and self.metrics.is_file() else 0
        )
        self.step = 0
        self.progress: Progress | None = None

    def poll(self) -> None:
        """Show what the stage wrote since the last poll."""
        lines, self.log_offset = _new_lines(self.log, self.log_offset)
        for line in lines:
            if ECHO.search(line):
                tqdm.write(f"   {line.strip()}", file=sys.stdout)  # above a bar, if one is drawn
                sys.stdout.flush()
        records, self.metrics_offset = _new_lines(self.metrics, self.metrics_offset)
        for record in records:
            try:
                step = int(json.loads(record)["step"])
            except (ValueError, KeyError, TypeError):  # not a step record: nothing to count
                continue
            if step > self.step:
                if self.progress is None:
                    self.progress = Progress(self.name, total=self.max_steps, unit="steps")
                self.progress.update(step - self.step)
                self.step = step

    def close(self) -> None:
        """Show the stage's last lines and end its progress (a final line off a terminal)."""
        self.poll()
        if self.progress is not None:
            self.progress.close()


def launch(script: str, args: list[str], launcher: str, watch: StageWatch) -> None:
    """Run a launcher to completion with its output in `watch.log`, showing its progress.

    Raises with the log's tail when it fails; an interrupt stops the launcher too.
    """
    cmd = [sys.executable, str(LAUNCHERS_DIR / script), *args]
    if launcher == "deepspeed":
        cmd = ["deepspeed", "--num_gpus", "2", str(LAUNCHERS_DIR / script), *args]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    with open(watch.log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                try:
                    proc.wait(timeout=POLL_S)
                except subprocess.TimeoutExpired:
                    watch.poll()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            watch.close()
    if proc.returncode != 0:
        log = watch.log
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); log {log}:\n{tail}")

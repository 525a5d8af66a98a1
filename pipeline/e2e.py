"""The end-to-end run on the built-in data: ingest -> VAE -> DiT -> generate -> evaluate.

Trains, on one fixed hash split of pbmc68k (30% of cells held out as the test set):
  - scLDM: the VAE, then the DiT with multi-condition CFG (configs/e2e/vae.yaml, dit.yaml);
  - the scDiffusion-style baseline: an unconditional skip-MLP denoiser on the same latents with a
    noisy-latent cell-type classifier for guidance (skip_mlp.yaml, classifier.yaml);
and samples the same VAE from its Gaussian prior (the paper's "w/o LDM" ablation). Every model
generates the test set's cells (same conditions and library sizes) at three seeds; the evaluation
compares them with the real-vs-real floor and the known-bad references and prints one table.

Each training stage runs as its own process through the same launchers a user runs, with its
output in `ROOT/<stage>.log`; the console shows each stage's progress meanwhile (`StageWatch`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from atlasldm.cli_parser import Parser
from atlasldm.configs import CONFIGS_DIR
from atlasldm.data.config import DataConfig
from atlasldm.data.to_anndata import split_to_anndata
from atlasldm.launchers import LAUNCHERS_DIR
from atlasldm.progress import Progress

CONFIGS = CONFIGS_DIR / "e2e"
LABEL_KEY = "cell_type"
VAL_FRACTION = 0.3  # must equal data.val_fraction of every configs/e2e recipe
MODELS = ("scldm", "vae_prior", "scdiffusion")  # the generated sets, in table order
STAGES = ("vae", "dit", "skip_mlp", "classifier")  # the trained stages, in training order
TABLE_KEYS = (
    ("w2", "W2 (30 PCs)"),
    ("mmd2_u", "MMD² unbiased"),
    ("energy", "energy"),
    ("c2st_knn_auc", "C2ST AUC kNN"),
    ("c2st_logreg_auc", "C2ST AUC logreg"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("w2_class_mean", "W2 per class"),
    ("cond_accuracy", "cond. accuracy"),
    ("genes/all/mean_pcc", "gene-mean r"),
    ("genes/all/var_pcc", "gene-var r"),
)
# CI's shortened run: a few steps per stage, 5 Euler steps, one seed, a small forest.
QUICK = {"vae": 20, "dit": 20, "skip_mlp": 20, "classifier": 20}
POLL_S = 2.0  # how often a running stage's log and metrics are read
# Lines of a stage's log worth showing on the console: `Progress` lines (`ingest: 1,200/7,000
# cells (17%), 410.0 cells/s, ETA 0:14`) and validation results (`step 300 | val/nll 682.5 ...`).
ECHO = re.compile(
    r"step \d+ \| val/|[\w .:/-]+: [\d,.]+(/[\d,.]+)? [^,]+( \(\d+%\))?, [\d,.]+ \S+/s"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the parsed command line."""
    p = Parser(description="End-to-end scLDM run on the built-in PBMC data.")
    p.add_argument("--root", type=Path, default=Path("runs/e2e"), help="folder of everything")
    p.add_argument("--quick", action="store_true", help="CI-sized run (minutes, not a result)")
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="generation seeds (None: 0 with --quick, else 0 1 2)",
    )
    p.add_argument(
        "--launcher",
        choices=["python", "deepspeed"],
        default="python",
        help="python: one process per stage; deepspeed: 2 ranks",
    )
    return p.parse_args(argv)


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


def _launch(script: str, args: list[str], launcher: str, watch: StageWatch) -> None:
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


def _max_steps(stage: str, quick: bool) -> int | None:
    """Steps the stage trains: the quick override, else its recipe's run.max_steps."""
    if quick:
        return QUICK[stage]
    recipe = yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text()) or {}
    return (recipe.get("run") or {}).get("max_steps")


def train(stage: str, root: Path, copy: Path, quick: bool, launcher: str) -> Path:
    """Train one stage from its configs/e2e recipe; return its export folder."""
    script = {"vae": "train_vae.py", "classifier": "train_classifier.py"}.get(stage, "train_dit.py")
    args = [str(CONFIGS / f"{stage}.yaml"), f"run.root={root}", f"run.name={stage}"]
    if stage == "vae":
        args.append(f"data.source={copy}")
    if launcher == "deepspeed":  # 2 ranks: same 64-cell global batch, 32 cells per rank
        args.append("batch.micro_cells=32")
    if quick:
        steps = QUICK[stage]
        args += [
            f"run.max_steps={steps}",
            f"run.eval_every={steps}",
            f"checkpoint.every_steps={steps}",
        ]
    watch = StageWatch(
        f"train {stage}", root / f"{stage}.log", root / stage, _max_steps(stage, quick)
    )
    _launch(script, args, launcher, watch)
    return root / stage / "export"


def real_splits(copy: Path, root: Path) -> tuple[Path, Path]:
    """Write the held-out test cells and the training cells as h5ad; return their paths."""
    config = DataConfig(source=str(copy), val_fraction=VAL_FRACTION, condition_columns=[LABEL_KEY])
    paths = root / "real_test.h5ad", root / "real_train.h5ad"
    for split, path in zip(("val", "train"), paths, strict=True):
        split_to_anndata(config, split).write_h5ad(path)
    return paths


def generate(name: str, exports: dict[str, Path], test: Path, root: Path, seeds, quick) -> Path:
    """Generate the test set's cells with one model at every seed; return the h5ad path."""
    from atlasldm.generation import cli

    out = root / "generated" / f"{name}.h5ad"
    args = [
        "--vae",
        str(exports["vae"]),
        "--match",
        str(test),
        "--match-keys",
        LABEL_KEY,
        "--out",
        str(out),
        "--seeds",
        *map(str, seeds),
    ]
    if name == "scldm":
        args += ["--denoiser", str(exports["dit"])]
    elif name == "scdiffusion":
        args += ["--denoiser", str(exports["skip_mlp"]), "--classifier", str(exports["classifier"])]
    if quick:
        args += ["--sampler", "euler", "--steps", "5"]
    elif name != "vae_prior":
        args += ["--sampler", "euler", "--steps", "50"]
    cli.run(args)
    return out


TRAJECTORY = ("CD14+ Monocyte", "CD19+ B")  # endpoints of the example trajectory


def trajectory(exports: dict[str, Path], root: Path, quick: bool) -> Path:
    """Generate an scLDM trajectory between two cell types (CFG interpolation); return its path."""
    from atlasldm.generation import cli

    out = root / "generated" / "scldm_trajectory.h5ad"
    cli.run(
        [
            "--vae",
            str(exports["vae"]),
            "--denoiser",
            str(exports["dit"]),
            "--interpolate",
            f"{LABEL_KEY}={TRAJECTORY[0]}:{TRAJECTORY[1]}",
            "--interp-steps",
            "5",
            "--n-cells",
            "40",
            "--sampler",
            "euler",
            "--steps",
            "5" if quick else "50",
            "--out",
            str(out),
        ]
    )
    return out


def evaluate(
    real: tuple[Path, Path], generated: dict[str, Path], traj: Path, root: Path, seeds, quick
) -> dict:
    """Run the evaluation protocol; return report.json as a dict."""
    from atlasldm.evaluation import cli

    out = root / "report"
    args = [
        "--real-test",
        str(real[0]),
        "--real-train",
        str(real[1]),
        "--label-key",
        LABEL_KEY,
        "--out",
        str(out),
        "--seeds",
        *map(str, seeds),
        "--generated",
        *[f"{k}={v}" for k, v in generated.items()],
        "--trajectory",
        f"scldm={traj}",
        "--training-run",  # the report's training_curves_<stage>.png
        *[f"{stage}={root / stage}" for stage in STAGES],
    ]
    args += ["--rf-trees", "50"] if quick else ["--umap"]
    cli.main(args)
    return json.loads((out / "report.json").read_text())


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "–"
    sem = entry.get("sem")
    shown = f"{entry['value']:.4g}"
    return shown + (f" ± {sem:.2g}" if sem is not None and np.isfinite(sem) else "")


def table(report: dict) -> str:
    """Return the comparison table (markdown): one row per set, Block B headline columns."""
    sets = report["sets"]
    order = ["real_floor", *MODELS, "poisson_mean", "gene_shuffled"]
    head = "| set | " + " | ".join(label for _, label in TABLE_KEYS) + " |"
    lines = [head, "|" + "---|" * (len(TABLE_KEYS) + 1)]
    for name in order:
        if name in sets:
            summary = sets[name]["summary"]
            cells = [_cell(summary.get(key)) for key, _ in TABLE_KEYS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(report: dict) -> list[str]:
    """Return one line per headline metric: does scLDM beat both model baselines?"""
    sets, lines = report["sets"], []
    for key in ("w2", "mmd2_u", "c2st_knn_auc"):
        ours = sets["scldm"]["summary"][key]["value"]
        others = {m: sets[m]["summary"][key]["value"] for m in MODELS[1:]}
        better = all(ours < v for v in others.values())
        shown = ", ".join(f"{m} {v:.4g}" for m, v in others.items())
        result = "beats both" if better else "DOES NOT beat both"
        lines.append(f"{key}: scLDM {ours:.4g} vs {shown} -> {result}")
    return lines


def main(argv: list[str] | None = None) -> dict:
    """Run the whole pipeline; print and save the table; return the report."""
    args = parse_args(argv)
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    timer = Timer()
    copy = root / "data" / "pbmc68k"
    if not (copy / "manifest.json").is_file():
        ingest = ["--source", "builtin:pbmc68k", "--out", str(copy)]
        watch = StageWatch("ingest", root / "ingest.log")
        timer.run("ingest", _launch, "ingest.py", ingest, "python", watch)
    exports = {}
    for stage in STAGES:
        exports[stage] = timer.run(
            f"train {stage}", train, stage, root, copy, args.quick, args.launcher
        )
    real = timer.run("real splits", real_splits, copy, root)
    generated = {
        m: timer.run(f"generate {m}", generate, m, exports, real[0], root, seeds, args.quick)
        for m in MODELS
    }
    traj = timer.run("generate trajectory", trajectory, exports, root, args.quick)
    report = timer.run("evaluate", evaluate, real, generated, traj, root, seeds, args.quick)
    text = "\n".join(
        [
            f"# End-to-end run ({'quick' if args.quick else 'full'}), {timer.total / 60:.1f} min",
            "",
            table(report),
            "",
            *verdict(report),
            "",
            "wall time per step (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timer.steps.items()),
        ]
    )
    (root / "e2e.md").write_text(text + "\n")
    (root / "e2e.json").write_text(
        json.dumps(
            {"steps_s": timer.steps, "total_s": timer.total, "verdict": verdict(report)}, indent=2
        )
    )
    print(text, flush=True)
    return report

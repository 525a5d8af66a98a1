"""The training-curve figure of a run: loss, learning rate, gradient norm and every validation
metric against the optimiser step, read from the run's `metrics.jsonl`.

Training draws it as `RUN_DIR/training_curves.png` when it exports; the evaluation
(`--training-run NAME=RUN_DIR`) and the end-to-end run draw it for the runs they are given.
It lives here, outside `train/` and `evaluation/`, because both use it and neither may import
the other (docs/design.md, 'Packages and import direction'); it imports nothing from the
project, and matplotlib only when a figure is drawn (training processes never need pyplot).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

LOSS = "train/loss"
# Panel key -> title; validation metrics (`val/*`) follow, one panel each, titled by their key.
PANELS = {LOSS: "training loss", "lr": "learning rate", "grad_norm": "gradient norm"}
# Legible at the saved size: no text under 10 pt.
FONT = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 13,
}
COLUMNS = 3
DPI = 100

Series = dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (steps, values), steps increasing


class CurveError(ValueError):
    """A metrics.jsonl that is missing, unreadable or without a training loss; one line."""


def _records(path: Path) -> list[dict[str, Any]]:
    """Return the JSON records of a metrics.jsonl, each with a `step`."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CurveError(f"{path} does not exist; give a run folder that trained a step") from None
    except OSError as exc:
        raise CurveError(f"cannot read {path} ({exc.strerror or exc})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CurveError(f"{path} line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise CurveError(f"{path} line {number} has no integer 'step'; not a run's metrics")
        records.append(record)
    return records


def read_series(metrics: str | Path) -> Series:
    """Return key -> (steps, values) of every numeric metric of a metrics.jsonl (or run folder).

    Records of one step are merged (the step's training line and its validation line). A
    resumed run logs the steps after its checkpoint again, and the later record wins, as it is
    the history the run continued from.
    """
    path = Path(metrics)
    path = path / "metrics.jsonl" if path.is_dir() else path
    by_step: dict[int, dict[str, Any]] = {}
    for record in _records(path):
        by_step.setdefault(record["step"], {}).update(record)
    lists: dict[str, tuple[list[int], list[float]]] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                steps, values = lists.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
    if LOSS not in lists:
        raise CurveError(f"{path} has no '{LOSS}' record; it is not the metrics of a training run")
    return {k: (np.asarray(s, dtype=np.int64), np.asarray(v)) for k, (s, v) in lists.items()}


def curve_panels(series: Series) -> Series:
    """Return the plotted series in panel order: loss, lr, grad norm (when logged), val/*."""
    keys = [k for k in PANELS if k in series] + sorted(k for k in series if k.startswith("val/"))
    return {k: series[k] for k in keys}


def draw_curves(panels: Series, out: str | Path, title: str) -> Any:
    """Write the panels as a PNG grid (one metric per panel) to `out`; return the Figure."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure  # no pyplot: no backend or global figure state

    cols = min(COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    last = max(int(steps[-1]) for steps, _ in panels.values())  # validation panels: same x range
    with rc_context(FONT):
        fig = Figure(figsize=(4.6 * cols, 3.4 * rows + 0.5), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, (key, (steps, values)) in zip(axes, panels.items(), strict=False):
            ax.plot(steps, values, lw=1.2, marker="o" if len(steps) <= 30 else None, ms=3)
            ax.set_title(PANELS.get(key, key.replace("val/", "validation ")))
            ax.set_xlim(0, max(last, 1) * 1.02)
            ax.set_xlabel("optimiser step")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        for ax in axes[len(panels) :]:
            fig.delaxes(ax)
        fig.suptitle(title)
        fig.savefig(out, dpi=DPI)
    return fig


def training_curves(metrics: str | Path, out: str | Path, title: str | None = None) -> Series:
    """Draw the training curves of a metrics.jsonl (or run folder) into the PNG `out`.

    Returns the plotted series, panel key -> (steps, values). Raises CurveError (one line)
    when the file is missing or unreadable or holds no training loss.
    """
    panels = curve_panels(read_series(metrics))
    source = Path(metrics)
    name = source.name if source.is_dir() else source.parent.name
    draw_curves(panels, out, title or f"training curves: {name}")
    return panels

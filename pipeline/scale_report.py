"""The scale study's report: per-size scores against the truth floor, gaps, verdicts, losses.

pipeline/scale_study.py runs the study; this module turns its evaluation report and runs into
the summary (`summarize`) and the markdown it prints (`render`).
"""

from __future__ import annotations

import json
from pathlib import Path

from atlasldm.pipeline.e2e_tables import value_text

STAGES = ("vae", "dit")

# Columns of the table: (report key, label, True when higher is better).
METRICS = (
    ("w2", "W2 (30 PCs)", False),
    ("c2st_knn_auc", "C2ST AUC kNN", False),
    ("c2st_logreg_auc", "C2ST AUC logreg", False),
    ("recall", "recall", True),
    ("precision", "precision", True),
    ("cond_accuracy", "cond. accuracy", True),
)


# Last logged training and validation losses of each stage, shown beside the scores: a train
# loss far below the validation loss means the corpus is too small for the steps (overfitting),
# both still falling means the steps are too few for the corpus.
CURVES = {"vae": ("train/nll", "val/nll"), "dit": ("train/loss", "val/flow_loss_ema")}


def last_losses(run_dir: Path, keys: tuple[str, ...]) -> dict[str, float]:
    """The last logged value of each key in `run_dir/metrics.jsonl` (absent keys left out)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.update({k: float(record[k]) for k in keys if k in record})
    return out


def losses_table(losses: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: per size, the last train and validation loss of each stage."""
    cols = [(stage, key) for stage, keys in CURVES.items() for key in keys]
    lines = ["| cells | " + " | ".join(f"{s} {k}" for s, k in cols) + " |"]
    lines.append("|" + "---|" * (len(cols) + 1))
    for n, by_stage in losses.items():
        cells = [f"{by_stage[s][k]:.4g}" if k in by_stage[s] else "–" for s, k in cols]
        lines.append(f"| {int(n):,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gap(value: float, floor: float, higher_better: bool) -> float:
    """How far a value is from the floor, positive on the bad side."""
    return floor - value if higher_better else value - floor


def summarize(report: dict, sizes: tuple[int, ...]) -> dict:
    """Return the floor and, per size, each metric's value, SEM and gap to the floor.

    A gap shrinks when its size |gap| falls from each corpus size to the next: a model past
    the floor (e.g. precision above the truth's, from too typical cells) is no closer to it.
    """
    sets = report["sets"]
    floor = {key: sets["real_floor"]["summary"][key]["value"] for key, _, _ in METRICS}
    rows = []
    for n in sizes:
        summary, metrics = sets[f"scldm_{n}"]["summary"], {}
        for key, _, higher in METRICS:
            value, sem = summary[key]["value"], summary[key].get("sem")
            gap = _gap(value, floor[key], higher)
            metrics[key] = {"value": value, "sem": sem, "gap": gap}
        rows.append({"cells": n, "metrics": metrics})
    pairs = list(zip(rows, rows[1:], strict=False))  # each size with the next larger one
    shrinks = {
        key: all(abs(a["metrics"][key]["gap"]) > abs(b["metrics"][key]["gap"]) for a, b in pairs)
        for key, _, _ in METRICS
    }
    return {"floor": floor, "rows": rows, "gap_shrinks": shrinks}


def _shown(entry: dict) -> str:
    return f"{value_text(entry)} ({entry['gap']:+.3g})"


def table(summary: dict) -> str:
    """Markdown table: the floor, then one row per size, each cell `value ± SEM (gap)`."""
    head = "| set | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    floor = summary["floor"]
    lines.append("| truth floor | " + " | ".join(f"{floor[k]:.4g}" for k, _, _ in METRICS) + " |")
    for row in summary["rows"]:
        cells = [_shown(row["metrics"][key]) for key, _, _ in METRICS]
        lines.append(f"| scLDM, {row['cells']:,} cells | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(summary: dict) -> list[str]:
    """One line per metric: its gap at each size and whether it shrinks as N grows."""
    lines = []
    for key, _, _ in METRICS:
        gaps = " -> ".join(
            f"{r['cells']:,}: {r['metrics'][key]['gap']:+.3g}" for r in summary["rows"]
        )
        word = "shrinks" if summary["gap_shrinks"][key] else "DOES NOT shrink"
        lines.append(f"{key} gap to the floor {gaps}: {word} with N")
    return lines


def budget_text(summary: dict) -> str:
    """What each size trained: '600 VAE and 1000 DiT steps at every size', or per size."""
    steps = summary["steps"]
    if summary["budget"] == "steps":
        vae, dit = (next(iter(steps[s].values())) for s in STAGES)
        return f"every size trains {vae} VAE and {dit} DiT steps (compute-matched)"
    per_size = ", ".join(f"{int(n):,}: {steps['vae'][n]}/{steps['dit'][n]}" for n in steps["vae"])
    return f"VAE/DiT steps in proportion to the corpus (data-matched epochs): {per_size}"


def render(summary: dict, quick: bool) -> str:
    """The study's markdown: the scores, the verdict per metric, the losses and the wall times."""
    parts = summary["parts"]
    steps = ", ".join(
        f"{name} {p['wall_s']:.0f}{'*' if p['reused'] else ''}" for name, p in parts.items()
    )
    return "\n".join(
        [
            f"# Synthetic scale study ({'quick' if quick else 'full'}), "
            f"{summary['parts_s'] / 60:.1f} min over all parts "
            f"(this launch {summary['launch_s'] / 60:.1f} min)",
            "",
            f"Truth: `synthetic:{summary['truth']}`; {budget_text(summary)}. Scored against "
            f"{summary['fresh_cells']['test']:,} fresh truth cells; the floor is "
            "truth against truth. Each cell: value ± SEM over seeds (gap to the floor, "
            "positive = worse).",
            "",
            table(summary),
            "",
            *verdict(summary),
            "",
            "Last logged losses (validation: 5% of each corpus, so the sets differ by size):",
            "",
            losses_table(summary["losses"]),
            "",
            f"wall time per part (s; * = done by an earlier launch, reused): {steps}",
        ]
    )

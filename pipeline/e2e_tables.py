"""The tables of an end-to-end run: models against the floor, and the gap split into stages."""

from __future__ import annotations

import numpy as np

from atlasldm.pipeline.e2e_options import MODELS

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
DECOMPOSITION_KEYS = (
    ("c2st_knn_auc", "C2ST AUC kNN"),
    ("c2st_logreg_auc", "C2ST AUC logreg"),
    ("w2", "W2 (30 PCs)"),
    ("recall", "recall"),
    ("cond_accuracy", "cond. accuracy"),
)
# The decomposition's sets, each adding one stage to the one before (docs/fidelity.md).
DECOMPOSITION = (
    ("real_floor", "real cells (training cells against the test cells)"),
    ("nb_resample", "+ NB noise: smoothed real expression, NB-sampled"),
    ("vae_means", "VAE means of the real cells, not sampled"),
    ("vae_recon", "+ VAE: real cells encoded, decoded, NB-sampled"),
    ("scldm", "+ latent generator: scLDM, true library sizes"),
    ("scldm_genlib", "+ library sizes: scLDM, generated library sizes"),
)
# (stage, set before, set after): what each stage adds to the kNN C2ST AUC.
STAGE_STEPS = (
    ("NB noise model", "real_floor", "nb_resample"),
    ("VAE", "nb_resample", "vae_recon"),
    ("latent generator", "vae_recon", "scldm"),
    ("library sizes", "scldm", "scldm_genlib"),
)


def value_text(entry: dict | None) -> str:
    """A report summary entry as `value ± SEM` (4 and 2 significant digits), "–" when absent."""
    if entry is None:
        return "–"
    sem = entry.get("sem")
    shown = f"{entry['value']:.4g}"
    return shown + (f" ± {sem:.2g}" if sem is not None and np.isfinite(sem) else "")


def _rows(sets: dict, names, keys) -> list[str]:
    lines = []
    for name in names:
        if name in sets:
            summary = sets[name]["summary"]
            cells = [value_text(summary.get(key)) for key, _ in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def table(report: dict) -> str:
    """Return the comparison table (markdown): one row per set, Block B headline columns."""
    order = ["real_floor", *MODELS, "poisson_mean", "gene_shuffled"]
    head = "| set | " + " | ".join(label for _, label in TABLE_KEYS) + " |"
    lines = [head, "|" + "---|" * (len(TABLE_KEYS) + 1)]
    return "\n".join(lines + _rows(report["sets"], order, TABLE_KEYS))


def decomposition_table(report: dict) -> str:
    """Return the decomposition table (markdown), or "" when the run made no decomposition."""
    sets = report["sets"]
    if "vae_recon" not in sets:
        return ""
    head = "| set | " + " | ".join(label for _, label in DECOMPOSITION_KEYS) + " | what it adds |"
    lines = [head, "|" + "---|" * (len(DECOMPOSITION_KEYS) + 2)]
    notes = dict(DECOMPOSITION)
    for name, _ in DECOMPOSITION:
        for row in _rows(sets, [name], DECOMPOSITION_KEYS):
            lines.append(f"{row} {notes[name]} |")
    return "\n".join(lines)


def _value(sets: dict, name: str, key: str) -> float | None:
    entry = sets.get(name, {}).get("summary", {}).get(key)
    return None if entry is None else float(entry["value"])


def stage_losses(report: dict, key: str = "c2st_knn_auc") -> dict[str, float]:
    """Return what each stage adds to `key` (set after minus set before), where both were scored."""
    sets, out = report["sets"], {}
    for stage, before, after in STAGE_STEPS:
        a, b = _value(sets, before, key), _value(sets, after, key)
        if a is not None and b is not None:
            out[stage] = b - a
    return out


def stage_lines(report: dict) -> list[str]:
    """One line per stage with its share of the kNN C2ST gap, then the stage that loses most."""
    losses = stage_losses(report)
    if not losses:
        return []
    lines = [f"{stage}: C2ST kNN AUC {delta:+.3f}" for stage, delta in losses.items()]
    worst = max(losses, key=losses.get)
    return [*lines, f"largest loss: {worst} ({losses[worst]:+.3f})"]


def verdict(report: dict) -> list[str]:
    """Return one line per headline metric: does scLDM beat the model baselines that ran?"""
    sets, lines = report["sets"], []
    others = [m for m in MODELS[1:] if m in sets]
    if "scldm" not in sets or not others:
        return lines
    for key in ("w2", "mmd2_u", "c2st_knn_auc"):
        ours = sets["scldm"]["summary"][key]["value"]
        values = {m: sets[m]["summary"][key]["value"] for m in others}
        better = all(ours < v for v in values.values())
        shown = ", ".join(f"{m} {v:.4g}" for m, v in values.items())
        result = "beats both" if better else "DOES NOT beat both"
        lines.append(f"{key}: scLDM {ours:.4g} vs {shown} -> {result}")
    return lines

"""Report folder: report.json (all settings and values) and report.md (tables).

The markdown always shows the real-vs-real floor and the known-bad rows next to the models,
with n per side, representation and estimator of every headline metric. Pitfalls cited by
number are those of docs/evaluation.md, 'Known pitfalls'.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

HEADLINE = (
    ("w2", "W2"),
    ("mmd2_u", "MMD² (unbiased)"),
    ("energy", "energy"),
    ("c2st_knn_auc", "C2ST kNN AUC"),
    ("c2st_logreg_auc", "C2ST LR AUC"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("density", "density"),
    ("coverage", "coverage"),
    ("fd", "FD"),
    ("w2_class_mean", "W2 class mean"),
    ("mmd2_u_class_mean", "MMD² class mean"),
    ("cond_accuracy", "cond. accuracy"),
    ("cond_accuracy_real_test", "cond. accuracy (real test)"),
)
GENE_KEYS = (
    "genes/all/mean_pcc",
    "genes/all/mean_r2",
    "genes/all/var_pcc",
    "genes/all/var_r2",
    "genes/all/zero_frac_pcc",
    "genes/hvg/mean_r2",
    "genes/libsize_log10_w1",
    "genes/genecorr_frobenius",
    "genes/genecorr_pcc",
)
CLASS_KEYS = (
    ("w2", "W2 (all cells of the class)"),
    ("mmd2_u", "MMD² unbiased (n = min(class size, 500))"),
    ("cond_accuracy", "conditional accuracy (share predicted as the conditioning label)"),
)
PROJ = ("centred", "uncentered_published")
KIND_ORDER = {"floor": 0, "known_bad": 1, "generated": 2}


def _jsonable(obj):
    """Return obj with numpy scalars/arrays converted and NaN/inf as null (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _fmt(entry: dict | None) -> str:
    if entry is None or entry.get("value") is None or not math.isfinite(entry["value"]):
        return "n/a"
    sem = entry.get("sem")
    sem = float("nan") if sem is None else sem  # None after a JSON round trip
    if math.isfinite(sem) and sem < 1e-12 * max(abs(entry["value"]), 1.0):
        sem = 0.0  # identical values across seeds; avoid printing round-off such as 8e-17
    return f"{entry['value']:.4g} ± {sem:.2g}" if math.isfinite(sem) else f"{entry['value']:.4g}"


def _ordered(sets: dict) -> list[str]:
    return sorted(sets, key=lambda n: (KIND_ORDER.get(sets[n]["kind"], 3), n))


def _table(sets: dict, keys: tuple[tuple[str, str], ...]) -> list[str]:
    lines = ["| set | kind | seeds | " + " | ".join(t for _, t in keys) + " |"]
    lines.append("|" + "---|" * (len(keys) + 3))
    for name in _ordered(sets):
        r = sets[name]
        cells = [_fmt(r["summary"].get(k)) for k, _ in keys]
        lines.append(f"| {name} | {r['kind']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    return lines


def _provenance(sets: dict, keys: tuple[tuple[str, str], ...]) -> list[str]:
    """Return one row per metric: representation, estimator and n real / n evaluated per set."""
    lines = ["| metric | representation | estimator | n real / n evaluated |", "|---|---|---|---|"]
    for key, title in keys:
        entries = {n: sets[n]["summary"][key] for n in _ordered(sets) if key in sets[n]["summary"]}
        if not entries:
            continue
        first = next(iter(entries.values()))
        ns = ", ".join(f"{n}: {e['n_real']}/{e['n_gen']}" for n, e in entries.items())
        lines.append(f"| {title} | {first['representation']} | {first['estimator']} | {ns} |")
    return lines


def _block_a_rows(sets: dict) -> list[str]:
    cols = ("scc", "pcc", "mmd_5kernel", "rf_auc", "w2_c", "w2_u", "mmd2b_c", "mmd2b_u")
    cols += ("global_f1", "fd", "1nn_acc")
    lines = ["| set | seed | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for name in _ordered(sets):
        for seed, m in sets[name]["per_seed"].items():
            if "block_a" not in m:
                continue
            sd, cf = m["block_a"]["scdiffusion"], m["block_a"]["cfgen"]
            cm = {k: v["mean"] for k, v in cf["class_mean"].items()}
            sl = cf["scldm_inferred"]
            vals = [sd["scc"], sd["pcc"], sd["mmd_5kernel"], sd["rf_auc"]]
            vals += [cm.get(f"{key}_{p}") for key in ("w2", "mmd2_biased") for p in PROJ]
            vals += [cf["global_f1"], sl["fd"], sl["one_nn_accuracy"]]
            txt = ["n/a" if v is None else f"{v:.4g}" for v in vals]
            lines.append(f"| {name} | {seed} | " + " | ".join(txt) + " |")
    return lines


def _class_table(sets: dict, key: str) -> list[str]:
    """Return a class × set table of one per-class metric (mean ± SEM over seeds)."""
    names = _ordered(sets)
    classes = sorted({c for n in names for c in sets[n].get("summary_per_class", {})})
    lines = ["| class | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for c in classes:
        cells = [_fmt(sets[n].get("summary_per_class", {}).get(c, {}).get(key)) for n in names]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def _skipped(sets: dict) -> list[str]:
    """Return one line per set and skipped class, with the seeds it was skipped at."""
    seen: dict[tuple[str, str, str], list] = {}
    for name in _ordered(sets):
        for seed, m in sets[name]["per_seed"].items():
            for cls, why in m["block_b"]["skipped"].items():
                seen.setdefault((name, cls, why), []).append(seed)
    lines = [
        f"- {n}: `{c}` skipped at seeds {', '.join(map(str, s))}: {why}"
        for (n, c, why), s in seen.items()
    ]
    return lines or ["- none"]


def markdown(results: dict) -> str:
    """Return the report.md text: headline, gene-level, provenance, Block A, skipped classes."""
    sets, st = results["sets"], results["settings"]
    head = [
        "# Evaluation report",
        "",
        f"Reference {st['n_reference']} cells, test {st['n_test']} cells, {st['n_genes']} genes, "
        f"{st['n_hvg']} HVGs ({st['hvg_flavor']}), {st['n_pcs']} PCs (reference PCA, centred). "
        f"Kernel bandwidth h = {st['bandwidth_h']:.4g}. Values: mean ± SEM over seeds "
        "(SEM = sample std / √seeds; one seed shows no SEM). `real_floor` is the real-vs-real "
        "floor (P0); `poisson_mean` and `gene_shuffled` are known-bad references.",
        "",
        "## Block B: headline",
        "",
    ]
    body = head + _table(sets, HEADLINE) + ["", "## Block B: gene-level fidelity", ""]
    body += _table(sets, tuple((k, k.removeprefix("genes/")) for k in GENE_KEYS))
    for key, title in CLASS_KEYS:
        body += ["", f"## Per class: {title}", ""] + _class_table(sets, key)
    body += ["", "## n, representation and estimator", ""] + _provenance(sets, HEADLINE)
    body += ["", "## Block A: paper-compatible (original aggregation per seed)", ""]
    body += [
        "scDiffusion-style: SCC/PCC of gene means, 5-kernel MMD (joint 50 PCs), RF AUC. "
        "CFGen-style: per-class mean of W2 and biased RBF MMD² on 30 PCs of a PCA fitted on the "
        "real test set, centred (`_c`) and uncentered_published (`_u`); global kNN F1. "
        "scLDM-style (inferred): FD and 1-NN accuracy on the same PCs. `mmd2b` = biased "
        "multi-σ RBF MMD² (depends on n, pitfall 2).",
        "",
    ]
    body += _block_a_rows(sets) + ["", "## Skipped classes", ""] + _skipped(sets)
    return "\n".join(body) + "\n"


def write_report(results: dict, out_dir: str | Path) -> Path:
    """Write report.json and report.md into ``out_dir`` (created) and return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(_jsonable(results), indent=1, allow_nan=False))
    (out / "report.md").write_text(markdown(results))
    return out

"""Orchestration of docs/evaluation.md: P0-P3, Block A and B per seed, floor, known-bad sets.

Every evaluated set (the real-vs-real floor, the known-bad generators and each generated
model) goes through the identical pipeline against the real test set; every Block B number
carries n per side, representation and estimator. Shape legend: N cells, G genes, P PCs.
"""

from __future__ import annotations

from dataclasses import asdict

import anndata as ad
import numpy as np

from atlasldm.evaluation.blockb import block_b
from atlasldm.evaluation.compat import cfgen_metrics, scdiffusion_metrics
from atlasldm.evaluation.conditional import celltypist_available, fit_label_classifier
from atlasldm.evaluation.context import Context, EvalConfig, EvalSet
from atlasldm.evaluation.distances import median_bandwidth
from atlasldm.evaluation.fixtures import gene_shuffled_counts, poisson_mean_counts
from atlasldm.evaluation.preprocess import (
    fit_projection,
    fit_representation,
    log1p_cp10k,
    to_dense,
)
from atlasldm.progress import Progress


def make_set(adata: ad.AnnData, label_key: str, is_normalized: bool = False) -> EvalSet:
    """Return an EvalSet from counts (or already log1p-CP10k values when ``is_normalized``)."""
    labels = adata.obs[label_key].astype(str).to_numpy()
    alpha = adata.obs["interp_alpha"].to_numpy(float) if "interp_alpha" in adata.obs else None
    if is_normalized:
        return EvalSet(to_dense(adata.X), labels, None, alpha)
    counts = to_dense(adata.X)
    return EvalSet(log1p_cp10k(counts), labels, counts.sum(1), alpha)


def align_genes(reference: ad.AnnData, others: dict[str, ad.AnnData]) -> tuple[list, dict]:
    """Return the genes shared by all sets (reference order) and what each set loses.

    ``missing[name]`` lists reference genes absent from that set; ``missing["dropped_extra"]``
    lists genes of other sets that the reference lacks. Both are dropped everywhere.
    """
    ref_genes = set(reference.var_names)
    common = ref_genes.intersection(*(set(a.var_names) for a in others.values()))
    genes = [g for g in reference.var_names if g in common]
    missing = {name: sorted(ref_genes - set(a.var_names)) for name, a in others.items()}
    extra = set().union(*(set(a.var_names) for a in others.values())) - ref_genes
    missing["dropped_extra"] = sorted(extra)
    return genes, missing


def build_context(reference: ad.AnnData, test: ad.AnnData, config: EvalConfig) -> Context:
    """Return the Context: HVGs, PCA, bandwidth and classifier fitted on reference cells (P0-P3)."""
    ref_counts = to_dense(reference.X)
    rep = fit_representation(ref_counts, config.n_top_genes, config.n_pcs, config.seed)
    ref_pcs = rep.pcs(log1p_cp10k(ref_counts))
    ref_labels = reference.obs[config.label_key].astype(str).to_numpy()
    test_set = make_set(test, config.label_key)
    settings = {
        "n_reference": reference.n_obs,
        "n_test": test.n_obs,
        "n_genes": reference.n_vars,
        "n_hvg": len(rep.hvg_idx),
        "hvg_genes": [str(g) for g in reference.var_names[rep.hvg_idx]],
        "hvg_flavor": "seurat_v3 (reimplemented loess, reference counts)",
        "classifier": "logistic regression on reference PCs",
        "celltypist_available": celltypist_available(),
    }
    return Context(
        config=config,
        rep=rep,
        test=test_set,
        test_pcs=rep.pcs(test_set.log),
        bandwidth=median_bandwidth(ref_pcs, config.mmd_n_global, config.seed),
        classifier=fit_label_classifier(ref_pcs, ref_labels),
        test_projection=(
            fit_projection(test_set.log[:, rep.hvg_idx], config.n_pcs, config.seed)
            if config.block_a
            else None
        ),
        settings=settings,
    )


def evaluate_set(ctx: Context, gen: EvalSet, progress: Progress | None = None) -> dict:
    """Return Block B (and Block A when configured) metrics of one set at one seed.

    ``progress`` counts one unit per metric block done.
    """
    out = {"block_b": block_b(ctx, gen)}
    if progress is not None:
        progress.update()
    if ctx.config.block_a:
        hvg = ctx.rep.hvg_idx
        out["block_a"] = {
            "scdiffusion": scdiffusion_metrics(
                ctx.test.log, gen.log, ctx.config.rf_trees, ctx.config.seed
            ),
            "cfgen": cfgen_metrics(
                ctx.test.log[:, hvg],
                gen.log[:, hvg],
                ctx.test.labels,
                gen.labels,
                ctx.config.n_pcs,
                ctx.config.min_class_cells,
                ctx.config.max_class_cells,
                ctx.config.seed,
                ctx.test_projection,
            ),
        }
        if progress is not None:
            progress.update()
    return out


def known_bad_sets(
    reference: ad.AnnData, test: ad.AnnData, floor: ad.AnnData, config: EvalConfig
) -> dict[str, dict[int, EvalSet]]:
    """Return the Poisson-mean and gene-shuffled sets per seed.

    See docs/evaluation.md, 'Floors and known-bad sets'.

    Poisson-mean: reference class profiles × the test cells' library sizes and labels.
    Gene-shuffled: the floor cells with every gene column permuted.
    """
    key = config.label_key
    test_counts = to_dense(test.X)
    out: dict[str, dict[int, EvalSet]] = {"poisson_mean": {}, "gene_shuffled": {}}
    for s in config.known_bad_seeds:
        ref_labels = reference.obs[key].astype(str).to_numpy()
        test_labels = test.obs[key].astype(str).to_numpy()
        pois = poisson_mean_counts(reference.X, ref_labels, test_labels, test_counts.sum(1), s)
        shuf = gene_shuffled_counts(floor.X, seed=s)
        for name, counts, obs in (
            ("poisson_mean", pois, test.obs),
            ("gene_shuffled", shuf, floor.obs),
        ):
            out[name][s] = make_set(ad.AnnData(counts, obs=obs[[key]].copy()), key)
    return out


def split_seeds(adata: ad.AnnData, label_key: str, is_normalized: bool) -> dict[int, EvalSet]:
    """Return one EvalSet per value of obs ``seed`` (a single seed 0 when the column is absent)."""
    if "seed" not in adata.obs:
        return {0: make_set(adata, label_key, is_normalized)}
    seeds = adata.obs["seed"].to_numpy()
    return {int(s): make_set(adata[seeds == s], label_key, is_normalized) for s in np.unique(seeds)}


def prepare(
    reference: ad.AnnData,
    test: ad.AnnData,
    floor: ad.AnnData,
    generated: dict[str, ad.AnnData],
    config: EvalConfig | None = None,
    normalized: frozenset[str] = frozenset(),
) -> tuple[Context, dict[str, tuple[str, dict[int, EvalSet]]]]:
    """Return the fitted Context and every set to evaluate as ``name -> (kind, seed -> set)``.

    Args:
        reference: training cells left after carving out the floor (raw counts); all fitting
            (HVGs, PCA, bandwidth, classifier) uses only these.
        test: held-out real test cells (raw counts).
        floor: real cells with the test's size and composition, never fitted on (P0).
        generated: name -> AnnData of generated cells; obs ``seed`` splits seeds.
        config: settings; defaults to ``EvalConfig()``.
        normalized: names whose X is already log1p-CP10k; a set whose
            ``uns["generated_is_normalized"]`` is true counts as listed.
    """
    config = config or EvalConfig()
    genes, missing = align_genes(reference, {"test": test, "floor": floor, **generated})
    reference, test, floor = reference[:, genes], test[:, genes], floor[:, genes]
    ctx = build_context(reference, test, config)
    ctx.settings["missing_genes"] = missing
    sets: dict[str, tuple[str, dict[int, EvalSet]]] = {
        "real_floor": ("floor", {0: make_set(floor, config.label_key)})
    }
    if config.known_bad:
        bad = known_bad_sets(reference, test, floor, config)
        sets.update({k: ("known_bad", v) for k, v in bad.items()})
    for name, a in generated.items():
        is_norm = name in normalized or bool(a.uns.get("generated_is_normalized", False))
        sets[name] = ("generated", split_seeds(a[:, genes], config.label_key, is_norm))
    return ctx, sets


def run(ctx: Context, sets: dict[str, tuple[str, dict[int, EvalSet]]]) -> dict:
    """Return ``{settings, sets}``: per set its kind, seeds, per-seed metrics and summary.

    Shows its progress in metric blocks (Block B, and Block A when configured, per set and
    seed): a bar on a terminal, a line with rate and ETA every half minute otherwise.
    """
    results = {}
    blocks = sum(len(per_seed) for _, per_seed in sets.values()) * (1 + ctx.config.block_a)
    with Progress("evaluate", total=blocks, unit="metric blocks") as progress:
        for name, (kind, per_seed) in sets.items():
            metrics = {s: evaluate_set(ctx, es, progress) for s, es in per_seed.items()}
            results[name] = {
                "kind": kind,
                "seeds": sorted(per_seed),
                "per_seed": metrics,
                "summary": summarize(metrics),
                "summary_per_class": summarize_classes(metrics),
            }
    settings = {**asdict(ctx.config), **ctx.settings, "bandwidth_h": ctx.bandwidth}
    return {"settings": settings, "sets": results}


def evaluate(
    reference: ad.AnnData,
    test: ad.AnnData,
    floor: ad.AnnData,
    generated: dict[str, ad.AnnData],
    config: EvalConfig | None = None,
    normalized: frozenset[str] = frozenset(),
) -> dict:
    """Return ``run(*prepare(...))``; see ``prepare`` for the arguments."""
    return run(*prepare(reference, test, floor, generated, config, normalized))


def _mean_sem(entries: list[dict]) -> dict:
    """Return the first entry's metadata with value = mean and sem = std(ddof=1)/√k of values."""
    vals = np.array([e["value"] for e in entries], dtype=float)
    sem = float(np.std(vals, ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else float("nan")
    return {**entries[0], "value": float(np.mean(vals)), "sem": sem, "n_seeds": len(vals)}


def summarize(per_seed: dict[int, dict]) -> dict:
    """Return mean ± SEM over seeds of every global Block B value (SEM = sample std / √seeds).

    A key missing at some seed (e.g. a class mean when no class had enough cells) is
    averaged over the seeds that have it; ``n_seeds`` says how many.
    """
    blocks = [per_seed[s]["block_b"]["global"] for s in sorted(per_seed)]
    keys = dict.fromkeys(k for b in blocks for k in b)  # ordered union over seeds
    return {k: _mean_sem([b[k] for b in blocks if k in b]) for k in keys}


def summarize_classes(per_seed: dict[int, dict]) -> dict:
    """Return per class: W2 / MMD² / energy and conditional accuracy / F1, mean ± SEM over seeds."""
    rows: dict[str, dict[str, list]] = {}
    for s in sorted(per_seed):
        bb = per_seed[s]["block_b"]
        for c, metrics in bb["per_class"].items():
            for k, e in metrics.items():
                rows.setdefault(c, {}).setdefault(k, []).append(e)
        for c, sc in bb["conditional"]["generated"]["per_class"].items():
            for k in ("accuracy", "f1"):
                entry = {"value": sc[k], "n_gen": sc["n"], "estimator": "classifier"}
                rows.setdefault(c, {}).setdefault(f"cond_{k}", []).append(entry)
    return {c: {k: _mean_sem(v) for k, v in m.items()} for c, m in sorted(rows.items())}

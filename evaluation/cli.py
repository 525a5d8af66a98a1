"""Command line of the evaluation: h5ad files or SOMA Experiments in, report folder out.

Examples::

    python launchers/evaluate.py --real-test test.h5ad --real-train train.h5ad \\
        --generated scldm=gen.h5ad --label-key cell_type --out runs/eval --seeds 0 1 2
    python launchers/evaluate.py --fixture pbmc68k --out /tmp/pbmc68k_eval

Every input is read and checked before anything is computed (`evaluation/inputs.py`): a bad
input prints one `error: ...` line and exits with code 2 without writing the report folder.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np

from atlasldm.cli_parser import Parser
from atlasldm.evaluation.context import EvalConfig
from atlasldm.evaluation.figures import trajectory_figure, write_figures
from atlasldm.evaluation.fixtures import PBMC_LABEL_KEY, carve_floor, pbmc68k_splits
from atlasldm.evaluation.inputs import (
    InputError,
    listing,
    parse_named,
    read_cells,
    require_cells,
    require_counts,
    require_label,
    require_shared_genes,
)
from atlasldm.evaluation.protocol import align_genes, make_set, prepare, run
from atlasldm.evaluation.report import write_report
from atlasldm.training_curves import CurveError, Series, curve_panels, draw_curves, read_series

# Names of the sets the report adds itself, and of the real sets in gene alignment.
RESERVED = ("real_floor", "poisson_mean", "gene_shuffled", "test", "floor", "trajectory")
COUNTS_FIX = "write the raw counts to X (e.g. adata.X = adata.layers['counts'])"


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _inputs(p: argparse._ArgumentGroup) -> None:
    # str, not Path: a Path would turn a SOMA URI's `s3://` into `s3:/`
    p.add_argument("--real-test", help="held-out real counts (h5ad or SOMA)")
    p.add_argument(
        "--real-train",
        help="training real counts (h5ad or SOMA); the floor and the reference come from it",
    )
    p.add_argument(
        "--fixture",
        choices=["pbmc68k"],
        default=None,
        help="use the bundled pbmc68k data (label bulk_labels) instead of --real-test/--real-train",
    )
    p.add_argument(
        "--generated",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="generated h5ad files or SOMA Experiments; obs 'seed' may hold several seeds",
    )
    p.add_argument(
        "--trajectory",
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="generated trajectories (obs interp_alpha): drawn as figures, not scored",
    )
    p.add_argument(
        "--normalized",
        nargs="*",
        default=[],
        metavar="NAME",
        help="names of --generated sets whose X is already log1p-CP10k",
    )
    p.add_argument(
        "--training-run",
        nargs="*",
        default=[],
        metavar="NAME=RUN_DIR",
        help="training run folders: draw training_curves_NAME.png from their metrics.jsonl",
    )
    p.add_argument(
        "--label-key",
        default="cell_type",
        help="obs column of the cell labels in every input (--fixture uses bulk_labels)",
    )
    p.add_argument("--out", required=True, type=Path, help="report folder (created)")


def _settings(p: argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--seeds",
        nargs="*",
        type=int,
        default=None,
        help="generation seeds to keep (None: all); also the known-bad seeds",
    )
    p.add_argument(
        "--known-bad-seeds",
        nargs="*",
        type=int,
        default=None,
        help="seeds of the known-bad references (None: --seeds, else 0 1 2)",
    )
    p.add_argument("--n-top-genes", type=positive_int, default=2000, help="seurat_v3 HVGs")
    p.add_argument(
        "--n-pcs", type=positive_int, default=30, help="principal components of the metrics"
    )
    p.add_argument(
        "--rf-trees", type=positive_int, default=1000, help="scDiffusion RF AUC forest size"
    )
    p.add_argument("--seed", type=int, default=0, help="subsampling/split seed")
    p.add_argument("--no-block-a", action="store_true", help="skip paper-compatible recipes")
    p.add_argument("--no-known-bad", action="store_true", help="skip known-bad references")
    p.add_argument("--umap", action="store_true", help="also draw joint UMAPs (slow)")


def build_parser() -> argparse.ArgumentParser:
    """Return the command's parser (every option with its help and default)."""
    p = Parser(description="Evaluate generated single-cell expression against real cells.")
    _inputs(p.add_argument_group("inputs and report"))
    _settings(p.add_argument_group("protocol settings"))
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the parsed command line."""
    return build_parser().parse_args(argv)


@dataclass
class Inputs:
    """Everything the evaluation reads, checked."""

    reference: ad.AnnData  # real training cells left after the floor is carved out
    test: ad.AnnData
    floor: ad.AnnData
    label_key: str
    generated: dict[str, ad.AnnData] = field(default_factory=dict)
    trajectories: dict[str, ad.AnnData] = field(default_factory=dict)
    normalized: frozenset[str] = frozenset()
    curves: dict[str, Series] = field(default_factory=dict)  # training run -> plotted series


def _read_real(path: str, option: str, label_key: str) -> ad.AnnData:
    what = f"{option} {path}"
    adata = read_cells(path, option)
    require_cells(adata, what)
    require_label(adata, label_key, what, "pass --label-key with the column of the cell labels")
    require_counts(adata, what, COUNTS_FIX)
    return adata


def load_real(args: argparse.Namespace) -> tuple[ad.AnnData, ad.AnnData, ad.AnnData, str]:
    """Return (reference, test, floor, label key): from the files, or the bundled fixture."""
    if args.fixture == "pbmc68k":
        if args.real_test is not None or args.real_train is not None:
            raise InputError("--fixture replaces --real-test/--real-train; give one or the other")
        # Stratified thirds: test, a floor with the test's composition, and the reference.
        s = pbmc68k_splits(seed=args.seed)
        return s["reference"], s["test"], s["floor"], PBMC_LABEL_KEY
    if args.real_test is None or args.real_train is None:
        raise InputError("--real-test and --real-train are both needed (or use --fixture pbmc68k)")
    test = _read_real(args.real_test, "--real-test", args.label_key)
    train = _read_real(args.real_train, "--real-train", args.label_key)
    labels = [a.obs[args.label_key].astype(str).to_numpy() for a in (train, test)]
    floor_idx, ref_idx = carve_floor(labels[0], labels[1], seed=args.seed)
    return train[ref_idx].copy(), test, train[floor_idx].copy(), args.label_key


def _keep_seeds(a: ad.AnnData, seeds: list[int] | None, what: str) -> ad.AnnData:
    """Return the cells of `a` at the requested seeds (all when `seeds` is None)."""
    if seeds is None or "seed" not in a.obs:
        return a
    kept = a[np.isin(a.obs["seed"].to_numpy(), seeds)].copy()
    if kept.n_obs == 0:
        held = listing(sorted(set(a.obs["seed"].tolist())))
        raise InputError(f"{what} has no cells at --seeds {listing(seeds)} (its seeds: {held})")
    return kept


def load_generated(
    specs: list[str], seeds: list[int] | None, label_key: str, normalized: set[str]
) -> dict[str, ad.AnnData]:
    """Return name -> AnnData from ``NAME=PATH`` specs, keeping only the requested seeds."""
    out = {}
    for name, path in parse_named(specs, "--generated", RESERVED).items():
        what = f"--generated {name}={path}"
        a = read_cells(path, "--generated")
        require_cells(a, what)
        a = _keep_seeds(a, seeds, what)
        fix = "write the labels into obs (generate --match-keys does) or change --label-key"
        require_label(a, label_key, what, fix)
        if name not in normalized and not a.uns.get("generated_is_normalized", False):
            require_counts(a, what, f"pass --normalized {name} if X is log1p-CP10k")
        out[name] = a
    return out


def load_trajectories(specs: list[str], label_key: str) -> dict[str, ad.AnnData]:
    """Return name -> trajectory cells (with obs interp_alpha and the label column)."""
    out = {}
    for name, path in parse_named(specs, "--trajectory").items():
        what = f"--trajectory {name}={path}"
        traj = read_cells(path, "--trajectory")
        require_cells(traj, what)
        require_label(traj, label_key, what, "give a trajectory written by generate")
        if "interp_alpha" not in traj.obs:
            raise InputError(f"{what}: obs has no interp_alpha column; give generate's output")
        require_counts(traj, what, "give the raw counts generate writes")
        out[name] = traj
    return out


def load_curves(specs: list[str]) -> dict[str, Series]:
    """Return name -> the training-curve series of each run folder."""
    out = {}
    for name, path in parse_named(specs, "--training-run").items():
        try:
            out[name] = curve_panels(read_series(path))
        except CurveError as exc:
            raise InputError(f"--training-run {name}={path}: {exc}") from None
    return out


def load_inputs(args: argparse.Namespace) -> Inputs:
    """Read and check every input; raise InputError (one line) on the first problem."""
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file; give a folder (it is created)")
    reference, test, floor, label_key = load_real(args)
    named = parse_named(args.generated, "--generated", RESERVED)
    unknown = sorted(set(args.normalized) - set(named))
    if unknown:
        raise InputError(
            f"--normalized {listing(unknown)}: no --generated set of that name "
            f"(sets: {listing(list(named))})"
        )
    generated = load_generated(args.generated, args.seeds, label_key, set(args.normalized))
    trajectories = load_trajectories(args.trajectory, label_key)
    others = {f"--real-test {args.real_test}" if args.real_test else "the test cells": test}
    others.update({f"--generated {n}={p}": generated[n] for n, p in named.items()})
    paths = parse_named(args.trajectory, "--trajectory")
    others.update({f"--trajectory {n}={p}": trajectories[n] for n, p in paths.items()})
    require_shared_genes(reference, others, args.n_pcs)
    normalized = set(args.normalized)
    normalized |= {n for n, a in generated.items() if a.uns.get("generated_is_normalized", False)}
    curves = load_curves(args.training_run)
    return Inputs(
        reference, test, floor, label_key, generated, trajectories, frozenset(normalized), curves
    )


def _say(message: str) -> None:
    """One progress line on stderr (where Progress writes too)."""
    print(f"evaluate: {message}", file=sys.stderr, flush=True)


def _config(args: argparse.Namespace, label_key: str) -> EvalConfig:
    bad_seeds = args.known_bad_seeds or args.seeds or [0, 1, 2]
    return EvalConfig(
        label_key=label_key,
        n_top_genes=args.n_top_genes,
        n_pcs=args.n_pcs,
        seed=args.seed,
        rf_trees=args.rf_trees,
        block_a=not args.no_block_a,
        known_bad=not args.no_known_bad,
        known_bad_seeds=tuple(bad_seeds),
    )


def _figures(args: argparse.Namespace, inputs: Inputs, ctx, sets) -> list[Path]:
    """Write the report's figures (sets, trajectories, training curves); return the paths."""
    figures = write_figures(ctx, sets, args.out, umap=args.umap)
    for name, traj in inputs.trajectories.items():
        others = {"test": inputs.test, "floor": inputs.floor, **inputs.generated}
        genes, _ = align_genes(inputs.reference, {**others, "trajectory": traj})
        figures.append(args.out / f"trajectory_{name}.png")
        trajectory_figure(ctx, name, make_set(traj[:, genes], inputs.label_key), figures[-1])
    for name, panels in inputs.curves.items():
        figures.append(args.out / f"training_curves_{name}.png")
        draw_curves(panels, figures[-1], f"training curves: {name}")
    return figures


def main(argv: list[str] | None = None) -> Path:
    """Run the evaluation protocol and write the report folder; return its path.

    A bad input prints `error: ...` (one line) and exits with code 2, writing nothing.
    """
    args = parse_args(argv)
    _say("reading and checking the inputs")
    try:
        inputs = load_inputs(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    _say(f"fitting HVGs, PCA and classifier on {inputs.reference.n_obs} reference cells")
    config = _config(args, inputs.label_key)
    ctx, sets = prepare(
        inputs.reference, inputs.test, inputs.floor, inputs.generated, config, inputs.normalized
    )
    results = run(ctx, sets)
    results["settings"]["inputs"] = {
        "fixture": args.fixture,
        "real_test": str(args.real_test),
        "real_train": str(args.real_train),
        "generated": list(args.generated),
        "normalized": sorted(inputs.normalized),
        "n_floor": inputs.floor.n_obs,
    }
    _say("writing the report and figures")
    write_report(results, args.out)
    figures = _figures(args, inputs, ctx, sets)
    print(f"wrote {args.out}/report.json, report.md and {len(figures)} figures")
    return args.out

"""Command line of the evaluation: h5ad files or SOMA Experiments in, report folder out.

Examples::

    python launchers/evaluate.py --real-test test.h5ad --real-train train.h5ad \\
        --generated scldm=gen.h5ad --label-key cell_type --out runs/eval --seeds 0 1 2
    python launchers/evaluate.py --fixture pbmc68k --out /tmp/pbmc68k_eval
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np

from atlasldm.evaluation.context import EvalConfig
from atlasldm.evaluation.figures import trajectory_figure, write_figures
from atlasldm.evaluation.fixtures import PBMC_LABEL_KEY, carve_floor, pbmc68k_splits
from atlasldm.evaluation.protocol import align_genes, make_set, prepare, run
from atlasldm.evaluation.report import write_report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the parsed command line."""
    p = argparse.ArgumentParser(description="Evaluate generated single-cell expression.")
    p.add_argument("--real-test", type=Path, help="held-out real counts (h5ad or SOMA)")
    p.add_argument("--real-train", type=Path, help="training real counts (h5ad or SOMA)")
    p.add_argument(
        "--fixture",
        choices=["pbmc68k"],
        default=None,
        help="use the bundled pbmc68k fixture as real data instead of --real-test/--real-train",
    )
    p.add_argument(
        "--generated",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="generated h5ad files; obs 'seed' may hold several seeds",
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
        help="generated sets whose X is already log1p-CP10k",
    )
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--seeds",
        nargs="*",
        type=int,
        default=None,
        help="generation seeds to keep (default: all); also the known-bad seeds",
    )
    p.add_argument(
        "--known-bad-seeds",
        nargs="*",
        type=int,
        default=None,
        help="seeds of the known-bad references (default: --seeds, else 0 1 2)",
    )
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--n-pcs", type=int, default=30)
    p.add_argument("--rf-trees", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="subsampling/split seed")
    p.add_argument("--no-block-a", action="store_true", help="skip paper-compatible recipes")
    p.add_argument("--no-known-bad", action="store_true", help="skip known-bad references")
    p.add_argument("--umap", action="store_true", help="also draw joint UMAPs (slow)")
    return p.parse_args(argv)


def read_cells(path: str | Path) -> ad.AnnData:
    """Return the cells of an .h5ad file or a SOMA Experiment (folder or URI) as AnnData.

    From SOMA: measurement RNA (else the first), X layer `counts` (generated) or `raw`
    (Census, training copies), else the first; var indexed by feature_id.
    """
    if str(path).endswith(".h5ad"):
        return ad.read_h5ad(path)
    import tiledbsoma
    import tiledbsoma.io

    try:
        exp = tiledbsoma.Experiment.open(str(path))
    except Exception as exc:  # tiledbsoma raises several types for a missing/foreign folder
        raise SystemExit(f"{path} is neither an .h5ad file nor a SOMA Experiment ({exc})") from exc
    with exp:
        ms = "RNA" if "RNA" in exp.ms else next(iter(exp.ms))
        layers = list(exp.ms[ms].X)
        layer = next((name for name in ("counts", "raw") if name in layers), layers[0])
        obs_id = "obs_id" if "obs_id" in exp.obs.schema.names else None
        return tiledbsoma.io.to_anndata(
            exp,
            measurement_name=ms,
            X_layer_name=layer,
            obs_id_name=obs_id,
            var_id_name="feature_id",
        )


def load_generated(specs: list[str], seeds: list[int] | None) -> dict[str, ad.AnnData]:
    """Return name -> AnnData from ``NAME=PATH`` specs, keeping only the requested seeds."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--generated expects NAME=PATH, got {spec!r}")
        a = read_cells(path)
        if seeds is not None and "seed" in a.obs:
            a = a[np.isin(a.obs["seed"].to_numpy(), seeds)].copy()
        out[name] = a
    return out


def load_real(args: argparse.Namespace) -> tuple[ad.AnnData, ad.AnnData, ad.AnnData, str]:
    """Return (reference, test, floor, label key): from the files, or the bundled fixture."""
    if args.fixture == "pbmc68k":
        # Stratified thirds: test, a floor with the test's composition, and the reference.
        s = pbmc68k_splits(seed=args.seed)
        return s["reference"], s["test"], s["floor"], PBMC_LABEL_KEY
    if args.real_test is None or args.real_train is None:
        raise SystemExit("--real-test and --real-train are required without --fixture")
    test, train = read_cells(args.real_test), read_cells(args.real_train)
    labels = [a.obs[args.label_key].astype(str).to_numpy() for a in (train, test)]
    floor_idx, ref_idx = carve_floor(labels[0], labels[1], seed=args.seed)
    return train[ref_idx].copy(), test, train[floor_idx].copy(), args.label_key


def main(argv: list[str] | None = None) -> Path:
    """Run the evaluation protocol and write the report folder; return its path."""
    args = parse_args(argv)
    reference, test, floor, label_key = load_real(args)
    generated = load_generated(args.generated, args.seeds)
    normalized = set(args.normalized)
    normalized |= {n for n, a in generated.items() if a.uns.get("generated_is_normalized", False)}
    bad_seeds = args.known_bad_seeds or args.seeds or [0, 1, 2]
    config = EvalConfig(
        label_key=label_key,
        n_top_genes=args.n_top_genes,
        n_pcs=args.n_pcs,
        seed=args.seed,
        rf_trees=args.rf_trees,
        block_a=not args.no_block_a,
        known_bad=not args.no_known_bad,
        known_bad_seeds=tuple(bad_seeds),
    )
    ctx, sets = prepare(reference, test, floor, generated, config, frozenset(normalized))
    results = run(ctx, sets)
    results["settings"]["inputs"] = {
        "fixture": args.fixture,
        "real_test": str(args.real_test),
        "real_train": str(args.real_train),
        "generated": list(args.generated),
        "normalized": sorted(normalized),
        "n_floor": floor.n_obs,
    }
    write_report(results, args.out)
    figures = write_figures(ctx, sets, args.out, umap=args.umap)
    for name, traj in load_generated(args.trajectory, None).items():
        if "interp_alpha" not in traj.obs:
            raise SystemExit(f"--trajectory {name}: obs has no interp_alpha column")
        others = {"test": test, "floor": floor, **generated, "trajectory": traj}
        genes, _ = align_genes(reference, others)
        figures.append(args.out / f"trajectory_{name}.png")
        trajectory_figure(ctx, name, make_set(traj[:, genes], label_key), figures[-1])
    print(f"wrote {args.out}/report.json, report.md and {len(figures)} figures")
    return args.out

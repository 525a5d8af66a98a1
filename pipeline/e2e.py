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

import json
import sys
from pathlib import Path

from atlasldm.data.config import DataConfig
from atlasldm.data.to_anndata import split_to_anndata
from atlasldm.pipeline.e2e_options import (
    CONFIGS,
    MODELS,
    QUICK,
    STAGES,
    OptionError,
    Options,
    parse_args,
    resolve,
)
from atlasldm.pipeline.e2e_tables import decomposition_table, stage_lines, table, verdict
from atlasldm.pipeline.stages import (
    StageWatch,
    Timer,
    launch,
    recipe_steps,
    stage_args,
    stage_script,
    step_args,
)

__all__ = ["MODELS", "QUICK", "STAGES", "StageWatch", "main"]
LABEL_KEY = "cell_type"
VAL_FRACTION = 0.3  # must equal data.val_fraction of every configs/e2e recipe
TRAJECTORY = ("CD14+ Monocyte", "CD19+ B")  # endpoints of the example trajectory


def _max_steps(stage: str, opts: Options) -> int | None:
    """Steps the stage trains: the quick override, else --set/profile, else the recipe's."""
    if opts.quick:
        return QUICK[stage]
    override = (opts.overrides.get(stage, {}).get("run") or {}).get("max_steps")
    return override or recipe_steps(CONFIGS / f"{stage}.yaml")


def train(stage: str, opts: Options, copy: Path) -> Path:
    """Train one stage from its configs/e2e recipe and overrides; return its export folder."""
    args = stage_args(CONFIGS / f"{stage}.yaml", opts.root, stage, copy)
    if opts.launcher == "deepspeed":  # 2 ranks: same 64-cell global batch, 32 cells per rank
        args.append("batch.micro_cells=32")
    args += opts.recipe_args(stage)
    if opts.quick:
        args += step_args(QUICK[stage])
    root = opts.root
    watch = StageWatch(
        f"train {stage}", root / f"{stage}.log", root / stage, _max_steps(stage, opts)
    )
    launch(stage_script(stage), args, opts.launcher, watch)
    return root / stage / "export"


def write_split(copy: Path, split: str, path: Path) -> None:
    """Write one side ("val" or "train") of the copy's e2e hash split, with labels, as h5ad."""
    config = DataConfig(source=str(copy), val_fraction=VAL_FRACTION, condition_columns=[LABEL_KEY])
    split_to_anndata(config, split).write_h5ad(path)


def split_cells(copy: Path, root: Path) -> tuple[Path, Path]:
    """Write the copy's held-out cells and its training cells as h5ad; return their paths."""
    paths = root / "real_test.h5ad", root / "real_train.h5ad"
    for split, path in zip(("val", "train"), paths, strict=True):
        write_split(copy, split, path)
    return paths


def corpus(opts: Options, timer: Timer) -> Path:
    """Ingest the built-in data; with --validation, then its training cells alone; return the copy.

    The validation copy holds only the training cells of the full split, so its own hash split
    (same fraction, new joinids) carves the validation cells out of them: the test cells are in
    neither of its splits.
    """
    full = opts.root / "data" / "pbmc68k"
    full.parent.mkdir(parents=True, exist_ok=True)
    _ingest("builtin:pbmc68k", full, opts.root / "ingest.log", timer)
    if not opts.validation:
        return full
    cells = opts.root / "data" / "training_cells.h5ad"
    if not cells.is_file():
        write_split(full, "train", cells)
    copy = opts.root / "data" / "pbmc68k_training_cells"
    _ingest(str(cells), copy, opts.root / "ingest_validation.log", timer)
    return copy


def _ingest(source: str, out: Path, log: Path, timer: Timer) -> None:
    """Ingest `source` into the training copy `out` unless it is there already."""
    if not (out / "manifest.json").is_file():
        args = ["--source", source, "--out", str(out)]
        timer.run(
            f"ingest {out.name}", launch, "ingest.py", args, "python", StageWatch("ingest", log)
        )


def _flags(options: dict) -> list[str]:
    """Generate-command flags of {"cfg_weight": "cell_type=2", "steps": 50}."""
    out = []
    for key, value in options.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def generate(model: str, exports: dict[str, Path], test: Path, opts: Options, library="auto"):
    """Generate the test set's cells with one model at every seed; return the h5ad path.

    `library="stats"` draws library sizes from the VAE's per-condition statistics instead of
    taking the test cells' own (the decomposition's `scldm_genlib`).
    """
    from atlasldm.generation import cli

    suffix = "_genlib" if library == "stats" else ""
    out = opts.root / "generated" / f"{model}{suffix}.h5ad"
    args = ["--vae", str(exports["vae"]), "--match", str(test), "--match-keys", LABEL_KEY]
    args += ["--out", str(out), "--library-size", library, "--seeds", *map(str, opts.seeds)]
    if model == "scldm":
        args += ["--denoiser", str(exports["dit"])]
    elif model == "scdiffusion":
        args += ["--denoiser", str(exports["skip_mlp"]), "--classifier", str(exports["classifier"])]
    cli.run(args + _flags(opts.generate_options(model)))
    return out


def decompose(exports: dict[str, Path], test: Path, opts: Options) -> dict[str, Path]:
    """Write the decomposition sets of the test cells (generation/decomposition.py); their paths."""
    import anndata as ad

    from atlasldm.generation.api import load_pretrained
    from atlasldm.generation.decomposition import decomposition_sets

    gen = load_pretrained(exports["vae"], device="cpu")
    paths = {}
    for name, adata in decomposition_sets(gen, ad.read_h5ad(test), opts.seeds).items():
        paths[name] = opts.root / "generated" / f"{name}.h5ad"
        adata.write_h5ad(paths[name])
    return paths


def trajectory(exports: dict[str, Path], opts: Options) -> Path:
    """Generate an scLDM trajectory between two cell types (CFG interpolation); return its path."""
    from atlasldm.generation import cli

    out = opts.root / "generated" / "scldm_trajectory.h5ad"
    args = ["--vae", str(exports["vae"]), "--denoiser", str(exports["dit"])]
    args += ["--interpolate", f"{LABEL_KEY}={TRAJECTORY[0]}:{TRAJECTORY[1]}", "--interp-steps", "5"]
    args += ["--n-cells", "40", "--out", str(out)]
    cli.run(args + _flags(opts.generate_options("scldm")))
    return out


def evaluate(real: tuple[Path, Path], generated: dict[str, Path], extra: dict, opts: Options):
    """Run the evaluation protocol on every set; return report.json as a dict.

    `extra` holds the trajectory (or None) and the trained stages' run folders.
    """
    from atlasldm.evaluation import cli

    out = opts.root / "report"
    args = ["--real-test", str(real[0]), "--real-train", str(real[1]), "--label-key", LABEL_KEY]
    args += ["--out", str(out), "--seeds", *map(str, opts.seeds)]
    args += ["--generated", *[f"{k}={v}" for k, v in generated.items()]]
    if "vae_means" in generated:
        args += ["--normalized", "vae_means"]
    if extra["trajectory"] is not None:
        args += ["--trajectory", f"scldm={extra['trajectory']}"]
    args += ["--training-run", *[f"{s}={opts.root / s}" for s in extra["stages"]]]
    if opts.validation:  # choosing settings needs Block B alone, not the paper recipes or UMAPs
        args.append("--no-block-a")
    args += ["--rf-trees", "50"] if opts.quick else [] if opts.validation else ["--umap"]
    cli.main(args)
    return json.loads((out / "report.json").read_text())


def generate_all(exports: dict[str, Path], test: Path, opts: Options, timer: Timer) -> dict:
    """Every generated set of the run (models, then the decomposition), name -> h5ad path."""
    sets = {m: timer.run(f"generate {m}", generate, m, exports, test, opts) for m in opts.models}
    if opts.decomposition and "scldm" in opts.models:
        sets["scldm_genlib"] = timer.run(
            "generate scldm_genlib", generate, "scldm", exports, test, opts, "stats"
        )
    if opts.decomposition:
        sets.update(timer.run("decomposition sets", decompose, exports, test, opts))
    return sets


def write_summary(report: dict, opts: Options, timer: Timer) -> str:
    """Write e2e.md and e2e.json; return the text printed at the end."""
    kind = "quick" if opts.quick else "full profile" if opts.full else "default"
    scored = "validation cells" if opts.validation else "test cells"
    parts = [f"# End-to-end run ({kind}, scored on the {scored}), {timer.total / 60:.1f} min"]
    parts += ["", table(report), "", *verdict(report)]
    decomposition = decomposition_table(report)
    if decomposition:
        parts += ["", "## Where the gap comes from", "", decomposition, "", *stage_lines(report)]
    steps = ", ".join(f"{k} {v:.0f}" for k, v in timer.steps.items())
    text = "\n".join([*parts, "", "wall time per step (s): " + steps])
    (opts.root / "e2e.md").write_text(text + "\n")
    summary = {"steps_s": timer.steps, "total_s": timer.total, "verdict": verdict(report)}
    summary["stage_lines"] = stage_lines(report)
    (opts.root / "e2e.json").write_text(json.dumps(summary, indent=2))
    return text


def main(argv: list[str] | None = None) -> dict:
    """Run the whole pipeline; print and save the tables; return the report."""
    try:
        opts = resolve(parse_args(argv))
    except OptionError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    opts.root.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    copy = corpus(opts, timer)
    exports = {s: timer.run(f"train {s}", train, s, opts, copy) for s in opts.stages}
    real = timer.run("real splits", split_cells, copy, opts.root)
    generated = generate_all(exports, real[0], opts, timer)
    traj = timer.run("generate trajectory", trajectory, exports, opts) if "dit" in exports else None
    extra = {"trajectory": traj, "stages": opts.stages}
    report = timer.run("evaluate", evaluate, real, generated, extra, opts)
    print(write_summary(report, opts, timer), flush=True)
    return report

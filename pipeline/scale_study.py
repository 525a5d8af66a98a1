"""Synthetic scale study (issue #15, part 4): does the gap to real cells shrink with more data?

The synthetic generator (data/synthetic.py) is the truth, so fresh cells can be drawn from it at
will. For each corpus size N the study ingests `synthetic:cells=N,...` through the ingest launcher,
trains the VAE and then the DiT through their launchers (configs/scale_study/, the e2e
architecture), and generates cells conditioned on cell_type that copy a FRESH truth set's labels
and library sizes. One evaluation then scores every size against the same fresh truth cells
(set A, `--real-test`), with a second fresh truth set B as `--real-train`: the floor is truth
against truth and the PCA reference is truth, so no model's training cells enter the scoring.

Nesting. With datasets=1 the generator's global parameters (`_Model`) do not depend on `cells`,
and cells come in blocks of GEN_BLOCK seeded by (seed, block). So a corpus of N cells holds the
same first floor(N / GEN_BLOCK) blocks as every larger corpus; a last, partial block is a different
draw from the same truth (its draws depend on its length). Blocks from ceil(max N / GEN_BLOCK) on
are in no corpus: those are the fresh truth cells. `check_same_truth` verifies the parameters.

Two budgets (`--budget`):
- `steps` (default, compute-matched): every size trains the same steps, so a larger corpus only
  means fewer repeats of each cell and a shrinking gap is the effect of data alone.
- `epochs` (data-matched): steps grow in proportion to the corpus, so every size sees each of its
  cells equally often, as when a lab trains the same number of epochs on a larger corpus. The
  given (or recipe) steps are those of the largest size; a size of n cells trains
  round(steps * n / max size). A shrinking gap is then the effect of data and the compute it buys.

A rerun reuses what is done: a stage whose marker (`ROOT/<what>.done.json`) records the same
inputs is skipped, and the wall time the marker keeps is still reported; a changed recipe, size
or upstream model redoes the stage and what follows.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasldm.cli_parser import Parser
from atlasldm.configs import CONFIGS_DIR
from atlasldm.data.synthetic import (
    GEN_BLOCK,
    SyntheticSpec,
    _Model,
    generate_block,
    parse_spec,
    var_frame,
)
from atlasldm.data.vocab import GeneVocab
from atlasldm.pipeline.scale_report import CURVES, STAGES, last_losses, render, summarize
from atlasldm.pipeline.stages import (
    StageWatch,
    Timer,
    launch,
    recipe_steps,
    stage_args,
    stage_script,
    step_args,
)

CONFIGS = CONFIGS_DIR / "scale_study"
LABEL_KEY = "cell_type"
TRUTH = "genes=1000,datasets=1,cell_types=6,seed=0"  # the generator; `cells` is set per corpus
SIZES = (5000, 20000, 50000)
BUDGETS = ("steps", "epochs")
# One generation seed: at 2,000 cells the seed-to-seed SEM is small (C2ST kNN about 0.002 over
# three seeds) against the differences between sizes, and each seed costs a minute per size.
SEEDS = (0,)
FRESH = {"test": 2000, "train": 4000}  # fresh truth cells: set A (--real-test), set B
# `--quick` (the test): tiny corpora of fewer genes, a few steps, one seed.
QUICK_TRUTH = "genes=200,datasets=1,cell_types=4,seed=0"
QUICK_SIZES = (600, 1200)
QUICK_STEPS = 20
QUICK_FRESH = {"test": 300, "train": 600}


def sizes_arg(text: str) -> tuple[int, ...]:
    """argparse type of --sizes: distinct positive integers, returned in increasing order."""
    try:
        sizes = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers") from None
    if sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return tuple(sizes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the parsed command line."""
    p = Parser(description="Synthetic scale study: generation fidelity against a known truth.")
    p.add_argument(
        "--sizes",
        type=sizes_arg,
        default=None,
        help=f"corpus sizes, comma-separated, in any order (None: {','.join(map(str, SIZES))}; "
        f"--quick: {','.join(map(str, QUICK_SIZES))})",
    )
    p.add_argument("--root", type=Path, default=Path("runs/scale_study"), help="folder of all")
    p.add_argument("--quick", action="store_true", help="test-sized run (seconds, not a result)")
    p.add_argument(
        "--budget",
        choices=BUDGETS,
        default="steps",
        help="steps: the same steps at every size (compute-matched); epochs: steps in "
        "proportion to the corpus size, the given steps being the largest size's",
    )
    for stage in STAGES:
        p.add_argument(
            f"--{stage}-steps",
            type=int,
            default=None,
            help=f"{stage} steps of every size, or of the largest with --budget epochs (None: "
            f"configs/scale_study/{stage}.yaml; --quick: {QUICK_STEPS})",
        )
    return p.parse_args(argv)


def spec_of(truth: str, cells: int) -> SyntheticSpec:
    """The generator spec of a corpus of `cells` cells drawn from `truth`."""
    return parse_spec(f"{truth},cells={cells}")


def check_same_truth(specs: list[SyntheticSpec]) -> None:
    """Raise unless every spec has the same generator parameters (same truth, nested corpora).

    Holds for datasets=1, where nothing in `_Model` depends on `cells`; with several datasets
    the dataset boundaries move with `cells` and a smaller corpus is no prefix of a larger one.
    """
    ref = _Model(specs[0])
    for spec in specs[1:]:
        if replace(spec, cells=0) != replace(specs[0], cells=0):
            raise ValueError(f"{spec} and {specs[0]} differ in more than `cells`")
        model = _Model(spec)
        for name in ("base", "programs", "shift", "lib_factor", "r", "ds_start", "type_mix"):
            if not np.array_equal(getattr(model, name), getattr(ref, name)):
                raise ValueError(f"generator parameter {name} differs: {spec} vs {specs[0]}")


def first_fresh_block(sizes: tuple[int, ...]) -> int:
    """The first generator block in no corpus of these sizes."""
    return -(-max(sizes) // GEN_BLOCK)


def fresh_truth(
    truth: str, sizes: tuple[int, ...], counts: dict[str, int], genes: list[str]
) -> dict[str, ad.AnnData]:
    """Draw the fresh truth sets (name -> cells) from blocks that no corpus holds.

    The sets take consecutive cells, in the order of `counts`, from block `first_fresh_block`
    on, so they share no cell with each other or with any corpus; the rare cell without a
    count is left out (a set can be a cell or two short). Genes follow `genes`.
    """
    first = first_fresh_block(sizes)
    total = sum(counts.values())
    n_blocks = -(-total // GEN_BLOCK)
    spec = spec_of(truth, (first + n_blocks) * GEN_BLOCK)
    check_same_truth([spec_of(truth, n) for n in sizes] + [spec])
    model = _Model(spec)
    parts = [generate_block(spec, b, model) for b in range(first, first + n_blocks)]
    X = sp.vstack([p[0] for p in parts]).tocsr()
    obs = pd.concat([p[1] for p in parts])
    cells = ad.AnnData(X=X, obs=obs, var=var_frame(spec))[:, genes]
    cells = cells[cells.X.getnnz(axis=1) > 0]  # an empty cell has no library size to match
    out, start = {}, 0
    for name, n in counts.items():
        out[name] = cells[start : start + n].copy()
        start += n
    return out


class Stages:
    """Markers of finished stages: a stage is skipped when its marker holds the same inputs.

    A marker also keeps the stage's wall time, so a rerun still reports what every part took.
    """

    def __init__(self, root: Path, timer: Timer) -> None:
        self.root, self.timer = root, timer
        self.parts: dict[str, dict] = {}  # stage -> {"wall_s": seconds, "reused": bool}

    def run(self, name: str, key: dict, fn, *args) -> dict:
        """Run fn(*args) unless `name` finished with `key`; return the key (the stage's identity).

        A stage that ran with other inputs, or did not finish, is redone from scratch.
        """
        marker = self.root / f"{name.replace(' ', '_')}.done.json"
        done = json.loads(marker.read_text()) if marker.is_file() else {}
        if done.get("key") == key:
            print(f"== {name}: done before ({done['wall_s']:.0f} s), reused", flush=True)
            self.parts[name] = {"wall_s": done["wall_s"], "reused": True}
            return key
        marker.unlink(missing_ok=True)
        self.timer.run(name, fn, *args)
        self.parts[name] = {"wall_s": self.timer.steps[name], "reused": False}
        marker.write_text(json.dumps({"key": key, "wall_s": self.parts[name]["wall_s"]}, indent=1))
        return key


def stage_steps(args: argparse.Namespace) -> dict[str, int | None]:
    """Steps of each stage given on the command line (or by --quick), else None (the recipe's)."""
    steps = {stage: getattr(args, f"{stage}_steps") for stage in STAGES}
    return {s: QUICK_STEPS if n is None and args.quick else n for s, n in steps.items()}


def ingest(source: str, copy: Path, log: Path) -> None:
    """Build the training copy of one corpus through the ingest launcher (from scratch)."""
    if copy.exists():
        shutil.rmtree(copy)
    watch = StageWatch("ingest", log)
    launch("ingest.py", ["--source", source, "--out", str(copy)], "python", watch)


def train(stage: str, run_root: Path, args: list[str], steps: int) -> None:
    """Train one stage through its launcher (from scratch) into `run_root/stage`."""
    run_dir = run_root / stage
    if run_dir.exists():
        shutil.rmtree(run_dir)
    watch = StageWatch(f"train {stage}", run_root / f"{stage}.log", run_dir, steps)
    launch(stage_script(stage), args, "python", watch)


def train_args(stage: str, run_root: Path, copy: Path, steps: int | None) -> list[str]:
    """The launcher arguments of one stage: its recipe, run folder and step override (if any)."""
    args = stage_args(CONFIGS / f"{stage}.yaml", run_root, stage, copy)
    return args + ([] if steps is None else step_args(steps))


def generate(run_root: Path, match: Path, out: Path, seeds: tuple[int, ...], quick: bool) -> None:
    """Generate the cells of `match` (its labels and library sizes) with one size's scLDM."""
    from atlasldm.generation import cli

    vae, dit = (str(run_root / stage / "export") for stage in STAGES)
    args = ["--vae", vae, "--denoiser", dit]
    args += ["--match", str(match), "--match-keys", LABEL_KEY, "--out", str(out)]
    args += ["--seeds", *map(str, seeds), "--sampler", "euler", "--steps", "5" if quick else "50"]
    cli.run(args)


def evaluate(truth: dict[str, Path], generated: dict[str, Path], out: Path, seeds, quick) -> None:
    """Score every size in one report against fresh truth set A, floor and reference from B."""
    from atlasldm.evaluation import cli

    args = ["--real-test", str(truth["test"]), "--real-train", str(truth["train"])]
    args += ["--label-key", LABEL_KEY, "--out", str(out), "--seeds", *map(str, seeds)]
    args += ["--generated", *[f"{k}={v}" for k, v in generated.items()]]
    cli.main([*args, "--rf-trees", "50" if quick else "200"])


@dataclass(frozen=True)
class Plan:
    """What one study runs: the truth, the corpus sizes, the fresh sets, seeds and steps."""

    root: Path
    quick: bool
    truth: str
    sizes: tuple[int, ...]
    fresh: dict[str, int]
    seeds: tuple[int, ...]
    override: dict[str, int | None]  # steps given on the command line (None: the recipe's)
    budget: str = "steps"  # "steps": the same at every size; "epochs": in proportion to size

    @classmethod
    def of(cls, args: argparse.Namespace, root: Path) -> Plan:
        """The plan of a command line."""
        quick = args.quick
        return cls(
            root=root,
            quick=quick,
            truth=QUICK_TRUTH if quick else TRUTH,
            sizes=args.sizes or (QUICK_SIZES if quick else SIZES),
            fresh=QUICK_FRESH if quick else FRESH,
            seeds=(0,) if quick else SEEDS,
            override=stage_steps(args),
            budget=args.budget,
        )

    def base_steps(self, stage: str) -> int:
        """The stage's steps at every size (budget steps) or at the largest size (epochs)."""
        given = self.override[stage]
        return int(recipe_steps(CONFIGS / f"{stage}.yaml")) if given is None else given

    def steps(self, stage: str, cells: int) -> int:
        """Steps the stage trains on a corpus of `cells` cells."""
        base = self.base_steps(stage)
        if self.budget == "steps":
            return base
        return max(1, round(base * cells / max(self.sizes)))

    def step_override(self, stage: str, cells: int) -> int | None:
        """The launcher's step override for this size (None: the recipe's steps apply)."""
        if self.budget == "steps" and self.override[stage] is None:
            return None
        return self.steps(stage, cells)


def _corpora(plan: Plan, stages: Stages) -> dict[int, Path]:
    """Ingest (or reuse) one training copy per size; return size -> copy folder."""
    copies = {}
    for n in plan.sizes:
        source = f"synthetic:{plan.truth},cells={n}"
        copies[n] = plan.root / "data" / f"cells_{n}"
        log = plan.root / f"ingest_{n}.log"
        stages.run(f"ingest {n}", {"source": source}, ingest, source, copies[n], log)
    return copies


def _truth_sets(plan: Plan, stages: Stages, genes: list[str]) -> tuple[dict[str, Path], dict]:
    """Draw (or reuse) the fresh truth sets; return name -> h5ad path, and the stage's key."""
    paths = {name: plan.root / f"truth_{name}.h5ad" for name in plan.fresh}
    key = {"truth": plan.truth, "sizes": list(plan.sizes), "counts": plan.fresh}

    def write() -> None:
        for name, cells in fresh_truth(plan.truth, plan.sizes, plan.fresh, genes).items():
            cells.write_h5ad(paths[name])

    return paths, stages.run("fresh truth", key, write)


def _model(plan: Plan, stages: Stages, n: int, copy: Path, match: Path, truth_key: dict):
    """Train (or reuse) one size's VAE and DiT and generate the match set's cells with them.

    Returns the generated h5ad path and the key of the last stage (what the evaluation follows).
    """
    run_root = plan.root / f"cells_{n}"
    run_root.mkdir(parents=True, exist_ok=True)
    key = {"source": f"synthetic:{plan.truth},cells={n}"}  # the ingest stage's key
    for stage in STAGES:
        args = train_args(stage, run_root, copy, plan.step_override(stage, n))
        recipe = (CONFIGS / f"{stage}.yaml").read_text()
        key = {"args": args, "recipe": recipe, "after": key}
        steps = plan.steps(stage, n)
        key = stages.run(f"train {stage} {n}", key, train, stage, run_root, args, steps)
    out = plan.root / "generated" / f"scldm_{n}.h5ad"
    out.parent.mkdir(exist_ok=True)
    key = {"seeds": list(plan.seeds), "truth": truth_key, "after": key}
    key = stages.run(f"generate {n}", key, generate, run_root, match, out, plan.seeds, plan.quick)
    return out, key


def _study(plan: Plan, stages: Stages) -> dict:
    """Run (or reuse) every stage; return the summary of the one report."""
    check_same_truth([spec_of(plan.truth, n) for n in plan.sizes])
    copies = _corpora(plan, stages)
    genes = list(GeneVocab.read(copies[plan.sizes[0]] / "genes.tsv").feature_ids)
    truth, truth_key = _truth_sets(plan, stages, genes)
    generated, keys = {}, []
    for n in plan.sizes:
        generated[f"scldm_{n}"], key = _model(plan, stages, n, copies[n], truth["test"], truth_key)
        keys.append(key)
    report_dir = plan.root / "report"
    eval_key = {"sets": {k: str(v) for k, v in generated.items()}, "after": keys}
    args = (truth, generated, report_dir, plan.seeds, plan.quick)
    stages.run("evaluate", eval_key, evaluate, *args)
    summary = summarize(json.loads((report_dir / "report.json").read_text()), plan.sizes)
    summary.update(
        sizes=list(plan.sizes),
        truth=plan.truth,
        fresh_cells=plan.fresh,
        first_fresh_block=first_fresh_block(plan.sizes),
        seeds=list(plan.seeds),
        budget=plan.budget,
        steps={stage: {n: plan.steps(stage, n) for n in plan.sizes} for stage in STAGES},
        losses={
            n: {s: last_losses(plan.root / f"cells_{n}" / s, CURVES[s]) for s in STAGES}
            for n in plan.sizes
        },
    )
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Run the study; print and save the table (ROOT/scale_study.md, .json); return the summary."""
    args = parse_args(argv)
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    stages = Stages(root, timer)
    summary = _study(Plan.of(args, root), stages)
    summary.update(
        parts=stages.parts,
        parts_s=sum(p["wall_s"] for p in stages.parts.values()),
        launch_s=timer.total,
    )
    text = render(summary, args.quick)
    (root / "scale_study.md").write_text(text + "\n")
    (root / "scale_study.json").write_text(json.dumps(summary, indent=2))
    print(text, flush=True)
    return summary

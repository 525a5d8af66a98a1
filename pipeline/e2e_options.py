"""What an end-to-end run does: its command line, its profile, and each stage's overrides.

A run trains the stages of `configs/e2e/<stage>.yaml` and generates with `GENERATE`. Two things
change them, in this order:
  - the profile: `--full` applies `configs/e2e/full.yaml` (longer training, settings chosen on the
    validation split; docs/fidelity.md);
  - `--set TARGET.KEY=VALUE`, where TARGET is a training stage (`dit.run.max_steps=3000`) or
    `generate.MODEL` (`generate.scldm.cfg_weight=cell_type=2`).
`--validation` trains on the training cells less a validation hold-out carved from them, and
scores on that hold-out: settings are chosen there, never on the test cells.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from atlasldm.cli_parser import Parser
from atlasldm.configs import CONFIGS_DIR

CONFIGS = CONFIGS_DIR / "e2e"
MODELS = ("scldm", "vae_prior", "scdiffusion")  # the generated sets, in table order
STAGES = ("vae", "dit", "skip_mlp", "classifier")  # the trained stages, in training order
NEEDS = {
    "scldm": ("vae", "dit"),
    "vae_prior": ("vae",),
    "scdiffusion": ("vae", "skip_mlp", "classifier"),
}
# CI's shortened run: a few steps per stage, 5 Euler steps, one seed, a small forest.
QUICK = {"vae": 20, "dit": 20, "skip_mlp": 20, "classifier": 20}
# Generation options per model (generate command flags without the dashes). The VAE prior
# needs no sampler; both denoisers integrate the same 50 Euler steps.
GENERATE = {
    "scldm": {"sampler": "euler", "steps": 50},
    "scdiffusion": {"sampler": "euler", "steps": 50},
    "vae_prior": {},
}


class OptionError(ValueError):
    """A bad --set or profile entry (the message names it and the fix)."""


@dataclass
class Options:
    """One end-to-end run, resolved from the command line."""

    root: Path
    quick: bool = False
    full: bool = False
    validation: bool = False
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    launcher: str = "python"
    models: tuple[str, ...] = MODELS
    decomposition: bool = True
    overrides: dict[str, dict] = field(default_factory=dict)  # target -> nested overrides

    @property
    def stages(self) -> tuple[str, ...]:
        """The training stages the chosen models need, in training order."""
        needed = {s for m in self.models for s in NEEDS[m]}
        return tuple(s for s in STAGES if s in needed)

    def recipe_args(self, stage: str) -> list[str]:
        """`key=value` overrides of a training stage's recipe (profile, then --set)."""
        return dotlist(self.overrides.get(stage, {}))

    def generate_options(self, model: str) -> dict:
        """The generate command's options for `model` (flag name without dashes -> value)."""
        options = dict(GENERATE[model])
        if self.quick and model != "vae_prior":
            options["steps"] = 5
        options.update(self.overrides.get("generate", {}).get(model, {}))
        return options


def dotlist(tree: dict, prefix: str = "") -> list[str]:
    """Flatten {"run": {"max_steps": 5}} into ["run.max_steps=5"] (lists as JSON)."""
    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += dotlist(value, f"{name}.")
        else:
            shown = json.dumps(value) if isinstance(value, list) else value
            out.append(f"{name}={shown}")
    return out


def merge(base: dict, extra: dict) -> dict:
    """Return `base` with `extra` merged in, nested dicts key by key."""
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both else value
    return out


def parse_set(spec: str) -> dict:
    """`dit.run.max_steps=3000` -> {"dit": {"run": {"max_steps": 3000}}} (value read as YAML)."""
    path, sep, text = spec.partition("=")
    keys = path.split(".")
    targets = (*STAGES, "generate")
    if not sep or len(keys) < 2 or keys[0] not in targets or not all(keys):
        raise OptionError(
            f"--set {spec!r}: expected TARGET.KEY=VALUE with TARGET one of {', '.join(targets)} "
            "(e.g. dit.run.max_steps=3000 or generate.scldm.cfg_weight=cell_type=2)"
        )
    if keys[0] == "generate" and keys[1] not in MODELS:
        raise OptionError(f"--set {spec!r}: generate.MODEL needs MODEL in {', '.join(MODELS)}")
    value = yaml.safe_load(text) if text else ""
    tree: dict = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        tree = {key: tree}
    return tree


def load_profile(path: Path) -> dict:
    """Read a profile file (target -> overrides); check its targets."""
    tree = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(tree) - {*STAGES, "generate"})
    if unknown:
        raise OptionError(f"{path}: unknown targets {unknown}; use {[*STAGES, 'generate']}")
    return tree


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the parsed command line."""
    p = Parser(description="End-to-end scLDM run on the built-in PBMC data.")
    p.add_argument(
        "--root", type=Path, default=None, help="folder of everything (None: runs/e2e[_full][_val])"
    )
    p.add_argument("--quick", action="store_true", help="CI-sized run (minutes, not a result)")
    p.add_argument("--full", action="store_true", help="the best result (configs/e2e/full.yaml)")
    p.add_argument(
        "--validation",
        action="store_true",
        help="train on the training cells less a 30%% hold-out of them, and score on that",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="generation seeds (None: 0 with --quick, else 0 1 2)",
    )
    p.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="generated sets"
    )
    p.add_argument(
        "--set",
        dest="sets",
        nargs="+",
        default=[],
        metavar="TARGET.KEY=VALUE",
        help="override a stage recipe (dit.run.max_steps=3000) or generation "
        "(generate.scldm.cfg_weight=cell_type=2)",
    )
    p.add_argument(
        "--no-decomposition", action="store_true", help="skip the gap decomposition sets"
    )
    p.add_argument(
        "--launcher",
        choices=["python", "deepspeed"],
        default="python",
        help="python: one process per stage; deepspeed: 2 ranks",
    )
    return p.parse_args(argv)


def default_root(args: argparse.Namespace) -> Path:
    """runs/e2e, with _full and _val suffixes for those runs."""
    return Path("runs/" + "e2e" + "_full" * args.full + "_val" * args.validation)


def resolve(args: argparse.Namespace) -> Options:
    """Return the run's Options: profile and --set overrides merged, root and seeds defaulted."""
    if args.quick and args.full:
        raise OptionError("--quick and --full exclude each other; give one")
    overrides: dict = load_profile(CONFIGS / "full.yaml") if args.full else {}
    for spec in args.sets:
        overrides = merge(overrides, parse_set(spec))
    return Options(
        root=(args.root or default_root(args)).resolve(),
        quick=args.quick,
        full=args.full,
        validation=args.validation,
        seeds=args.seeds or ([0] if args.quick else [0, 1, 2]),
        launcher=args.launcher,
        models=tuple(m for m in MODELS if m in args.models),
        decomposition=not args.no_decomposition,
        overrides=overrides,
    )

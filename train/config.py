"""Typed run configuration: dataclass schema, overridden by YAML files, then `key=value` args.

Loading order (docs/design.md): structured schema -> YAML files in the order given ->
`key=value` overrides -> `OmegaConf.to_object`. Unknown keys, wrong types and bad enum values
fail at load with a message that names the key and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from atlasldm.cli_parser import Parser
from atlasldm.cli_schema import schema_help
from atlasldm.models.config_names import upgrade_config_tree

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be loaded; the message names the key and the fix."""


def _check_literals(obj: Any, prefix: str = "") -> None:
    """Raise ConfigError when a `Literal[...]` field holds a value outside its choices."""
    if not dataclasses.is_dataclass(obj):
        return
    hints = typing.get_type_hints(type(obj))
    for fld in dataclasses.fields(obj):
        value = getattr(obj, fld.name)
        hint = hints.get(fld.name)
        if typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
            choices = ", ".join(repr(c) for c in typing.get_args(hint))
            raise ConfigError(
                f"config key '{prefix}{fld.name}' = {value!r} is not one of {choices}; "
                f"set it to one of these"
            )
        _check_literals(value, f"{prefix}{fld.name}.")


def _read_yaml(schema: type, path: Path) -> Any:
    """Return a YAML config file as a config node, old field names renamed (with a warning)."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        not_yaml = path.suffix not in (".yaml", ".yml")
        hint = " (a key=value override needs the '=')" if not_yaml else ""
        raise ConfigError(f"config file {path} {what}; check the path{hint}")
    text = path.read_text()
    if "${" in text or "_target_" in text:
        raise ConfigError(
            f"{path}: interpolation ('${{') and '_target_' are not allowed in configs; "
            "write plain values"
        )
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} {_yaml_problem(exc)}; fix the YAML") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(
            f"{path}: the top level is a list, not sections (run:, optim:, ...); fix the YAML"
        )
    return _upgraded(schema, node, str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`line N: what` of a YAML syntax error (1-based line, and where the construct began)."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f": {str(exc).splitlines()[0]}"
    where, start = f"line {mark.line + 1}", getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or "not valid YAML"
    context = getattr(exc, "context", None)
    if context and start is not None and start.line != mark.line:
        problem += f" ({context} started on line {start.line + 1})"
    return f"{where}: {problem}"


def _upgraded(schema: type, node: Any, where: str) -> Any:
    # Model config fields renamed since a config was written (models.config_names) keep
    # loading under their new names, with one deprecation warning per old key.
    return OmegaConf.create(upgrade_config_tree(schema, OmegaConf.to_container(node), where))


def load_config(
    schema: type[T], yaml_paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()
) -> T:
    """Return a `schema` instance built from its defaults, YAML files and `key=value` overrides.

    Raises:
        ConfigError: unknown key, wrong type, unreadable YAML, or a value outside a Literal.
    """
    try:
        cfg = OmegaConf.structured(schema)
        OmegaConf.set_struct(cfg, True)
        for path in yaml_paths:
            cfg = OmegaConf.merge(cfg, _read_yaml(schema, Path(path)))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        if overrides:
            dotlist = OmegaConf.from_dotlist(list(overrides))
            cfg = OmegaConf.merge(cfg, _upgraded(schema, dotlist, "the key=value overrides"))
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except ValueError as exc:  # a section's own check (e.g. DataConfig) or OmegaConf's type check
        key = getattr(exc, "full_key", None)
        where = f" for '{key}'" if key else ""
        reason = str(exc).splitlines()[0]  # OmegaConf appends full_key/object_type lines
        fix = "fix it in the YAML or the override"
        raise ConfigError(f"bad config value{where}: {reason}; {fix}") from exc
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        reason = str(exc).splitlines()[0]
        raise ConfigError(
            f"bad config key '{key}': {reason}. "
            "Check the spelling against the dataclass schema and the value's type"
        ) from exc
    _check_literals(obj)
    return obj  # type: ignore[return-value]


def to_yaml(obj: Any) -> str:
    """Return the resolved config as YAML text (printed at start, saved in the run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def stage_parser(schema: type) -> Parser:
    """The command line of a training stage; its --help lists every config key of `schema`."""
    parser = Parser(
        description=f"Train one stage. Its config (schema {schema.__name__}) is the defaults "
        "listed below,\nthen the YAML files in the order given, then the key=value overrides.",
        epilog=schema_help(schema),
    )
    parser.add_argument(
        "args",
        nargs="*",
        default=[],
        metavar="CONFIG.yaml | KEY=VALUE",
        help="YAML config files (merged in order), then section.key=value overrides "
        "(e.g. optim.lr=3e-4)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (YAML, after the files and overrides) and exit "
        "without training",
    )
    return parser


def parse_stage_argv(schema: type, argv: Sequence[str]) -> tuple[list[str], list[str], bool]:
    """Return (YAML paths, key=value overrides, --print-config given) of a stage's argv.

    `--help` prints the usage and every config key, then exits 0; an unknown option is one
    line and exit 2. The deepspeed launcher's `--local_rank=N` is ignored.
    """
    kept = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    args = stage_parser(schema).parse_mixed(kept, rest="args")
    yamls, overrides = split_cli(args.args)
    return yamls, overrides, args.print_config


def split_cli(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split argv into YAML paths and `key=value` overrides; drop the launcher's --local_rank."""
    yamls, overrides = [], []
    for arg in argv:
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            continue
        (overrides if "=" in arg else yamls).append(arg)
    return yamls, overrides


# --------------------------------------------------------------------------------------------
# Run-level schema. A stage schema subclasses `TrainConfig` and adds its own `model` and `data`
# sections (e.g. `class VAEStageConfig(TrainConfig): model: VAEConfig = field(...)`), so every
# stage shares these sections and their YAML keys (`optim.lr=...`, `batch.global_cells=...`).
# --------------------------------------------------------------------------------------------

Precision = Literal["fp32", "bf16", "fp16"]
CompileSwitch = Literal["auto", "on", "off"]
# YAML 1.1 reads a bare on/off as true/false, so the field also takes the booleans (as on/off).
CompileValue = Literal["auto", "on", "off", True, False]


@dataclass
class RunConfig:
    """Identity and length of a run."""

    name: str = "debug"  # run folder name under `root`; one folder per run
    root: str = "runs"  # parent folder of run folders (relative or absolute; from the CLI)
    seed: int = 0  # base seed; per-step generators are seeded by (seed, step, rank)
    max_steps: int = 1000  # optimiser steps to train in total (the LR schedule spans these)
    eval_every: int = 0  # optimiser steps between evaluations; 0 = never
    # torch intra-op threads per rank. 0 = OMP_NUM_THREADS if exported, else usable cores //
    # local ranks; a value > 0 wins over OMP_NUM_THREADS (more threads than cores busy-wait).
    threads_per_rank: int = 0

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ConfigError(
                f"run.max_steps = {self.max_steps} must be >= 1: a run trains at least one step "
                "(to export an existing checkpoint: python launchers/export.py RUN_DIR)"
            )
        if self.eval_every < 0:
            raise ConfigError(f"run.eval_every = {self.eval_every} must be >= 0 (0 = never)")
        if self.threads_per_rank < 0:
            raise ConfigError(
                f"run.threads_per_rank = {self.threads_per_rank} is negative; "
                "set 0 (one share of the cores per local rank) or a positive count"
            )


@dataclass
class OptimConfig:
    """AdamW and learning-rate schedule (docs/model.md, 'Training recipes')."""

    lr: float = 1e-3  # peak learning rate; explicit, never rescaled by world size
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.0  # decoupled weight decay; matrices only (not norms/biases/embeddings)
    schedule: Literal["wsd", "cosine"] = "wsd"  # warmup-stable-decay or warmup-cosine
    warmup_frac: float = 0.1  # share of max_steps warming up linearly from lr / 100 to lr
    decay_frac: float = 0.1  # WSD only: share of max_steps at the end with sqrt-decay
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    grad_clip: float = 10.0  # global gradient-norm clip (L2); 0 disables clipping

    def __post_init__(self) -> None:
        bounds = [
            (self.lr > 0, f"optim.lr = {self.lr} must be > 0"),
            (self.eps > 0, f"optim.eps = {self.eps} must be > 0"),
            (all(0.0 <= b < 1.0 for b in self.betas), f"optim.betas = {self.betas} not in [0, 1)"),
            (self.weight_decay >= 0, f"optim.weight_decay = {self.weight_decay} must be >= 0"),
            (0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio = {self.min_lr_ratio} not in [0,1]"),
            (self.grad_clip >= 0, f"optim.grad_clip = {self.grad_clip} must be >= 0 (0 = off)"),
        ]
        for ok, message in bounds:
            if not ok:
                raise ConfigError(f"{message}; fix it in the YAML or the key=value override")
        if not 0.0 <= self.warmup_frac <= 1.0 or not 0.0 <= self.decay_frac <= 1.0:
            raise ConfigError("optim.warmup_frac and optim.decay_frac must lie in [0, 1]")
        if self.schedule == "wsd" and self.warmup_frac + self.decay_frac > 1.0:
            raise ConfigError(
                f"optim.warmup_frac + optim.decay_frac = {self.warmup_frac + self.decay_frac} "
                "> 1; shorten the warmup or the decay"
            )


@dataclass
class BatchConfig:
    """Batch sizes in cells; gradient accumulation is derived, never configured."""

    global_cells: int = 1024  # cells per optimiser step over all ranks
    micro_cells: int = 128  # cells per forward/backward on one rank


@dataclass
class PrecisionConfig:
    """Numeric precision of the engine, and whether its model runs compiled."""

    dtype: Precision = "bf16"  # parameter/activation dtype; fp32 master weights for bf16/fp16
    # torch.compile (train/compile.py): on | off | auto. auto = eager: on CPU a step gains 12-18%
    # but the cold compile costs 40-150 s, more than a CPU-sized run saves (docs/compile.md);
    # CUDA is not measured yet
    compile: CompileValue = "auto"

    def __post_init__(self) -> None:
        self.compile = {True: "on", False: "off"}.get(self.compile, self.compile)
        if self.compile not in typing.get_args(CompileSwitch):
            raise ConfigError(
                f"precision.compile = {self.compile!r} is not one of 'auto', 'on', 'off'; "
                "set one of these"
            )


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO partitioning."""

    stage: int = 2  # ZeRO stage 0-3; 1/2 keep parameters replicated, 3 partitions them
    offload_optimizer: Literal["none", "cpu"] = "none"  # where optimiser states live

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero.stage = {self.stage} is not one of 0, 1, 2, 3")


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (fp32 copy)."""

    enabled: bool = False  # keep an EMA copy (the DiT uses one; the VAE does not)
    decay: float = 0.9999  # per-update decay
    every: int = 10  # optimiser steps between EMA updates
    start_step: int = 10_000  # before this step the EMA just copies the weights


@dataclass
class CheckpointConfig:
    """Tagged checkpoints and auto-resume."""

    every_steps: int = 1000  # optimiser steps between checkpoints; 0 = only at the end
    keep_last_k: int = 3  # complete checkpoints kept; older ones are deleted
    resume: str = "auto"  # "auto" (continue from `latest` if present), "never", or a tag
    # Seconds a rank has, after SIGTERM or its launcher's death, to save and stop before it exits
    # non-zero without the save. Below the 30 s that SLURM (KillWait), Kubernetes, torchrun and
    # DeepSpeed's launcher allow by default; raise it together with them (docs/preemption.md).
    preempt_timeout_s: float = 25.0

    def __post_init__(self) -> None:
        if not self.preempt_timeout_s > 0:
            raise ConfigError(
                f"checkpoint.preempt_timeout_s = {self.preempt_timeout_s} must be > 0; set the "
                "seconds a rank may spend saving after SIGTERM (below the scheduler's grace)"
            )


@dataclass
class LoggingConfig:
    """Metric logging."""

    every_steps: int = 50  # optimiser steps between metric lines / W&B logs
    wandb_project: str = "atlasldm"  # W&B project name
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # WANDB_MODE wins if set
    progress_bar: bool = True  # tqdm bar with cells/s on rank 0
    peak_tflops: float = 0.0  # per-device dense peak for perf/mfu; 0 = by GPU name (none on CPU)


@dataclass
class LoopConfig:
    """Guards of the training loop."""

    max_bad_steps: int = 10  # steps with a NaN/inf loss that are skipped before the run stops


@dataclass
class TrainConfig:
    """All run-level sections; stage schemas subclass this and add `model` and `data`."""

    run: RunConfig = field(default_factory=RunConfig)  # identity, seed, length
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimiser and schedule
    batch: BatchConfig = field(default_factory=BatchConfig)  # batch sizes in cells
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)  # engine dtype
    zero: ZeroConfig = field(default_factory=ZeroConfig)  # ZeRO partitioning
    ema: EMAConfig = field(default_factory=EMAConfig)  # weight EMA
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # saves, resume
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # metrics, W&B
    loop: LoopConfig = field(default_factory=LoopConfig)  # NaN guard


def accumulation_steps(batch: BatchConfig, world: int) -> int:
    """Return the gradient-accumulation steps so that global = micro x accumulation x world.

    Raises:
        ConfigError: the global batch is not a multiple of micro_cells x world.
    """
    per_step = batch.micro_cells * world
    if batch.micro_cells <= 0 or batch.global_cells <= 0 or batch.global_cells % per_step:
        raise ConfigError(
            f"batch.global_cells = {batch.global_cells} must be a positive multiple of "
            f"batch.micro_cells ({batch.micro_cells}) x data-parallel world size ({world}) "
            f"= {per_step}; change global_cells or micro_cells"
        )
    return batch.global_cells // per_step

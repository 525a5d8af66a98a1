"""`torch.compile` as a config switch, `precision.compile` = auto | on | off (docs/compile.md).

The loop (`train.loop.open_run`) calls `compile_plan` before it writes the run folder and, when
that says yes, `compile_engine` right after DeepSpeed built the engine. "on" compiles where the
benchmark (bench/compile.py) found the gain: the VAE's gene-query block, and every other model
whole, with DeepSpeed's `engine.compile()` (`nn.Module.compile`). Either way it compiles in
place: parameters, state_dict names and therefore checkpoints and exports stay as they are.
Shapes are left to torch's automatic dynamic shapes: the first step compiles for its shapes, the
first step with another token count recompiles once with symbolic sizes, and later batches reuse
that graph (docs/compile.md, 'Recompiles').

torch compiles lazily, at the first call, so two checks keep a broken compiler from ending a
run. Before anything is written, a probe compiles a small function and runs it forward and
backward: a machine without a working C++ compiler (inductor on CPU) or Triton (CUDA) fails
there. And the stage's loss and evaluation functions are wrapped: when a call fails under
compile, it runs again eagerly with the same random draws; if that passes, the compiler was at
fault (an operator it cannot build), otherwise the error is the model's own and is raised as it
is. On a compiler fault "auto" warns once (one line) and trains eagerly from then on, "on" stops
with one line that names the problem and the fix. Only public `torch.compiler` APIs are used.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from atlasldm.models.vae import VAE
from atlasldm.train.config import CompileSwitch, ConfigError
from atlasldm.train.distributed import is_main
from atlasldm.train.stage import Stage

BACKEND = "inductor"  # torch's default compiler; DeepSpeed's CPU and CUDA accelerators name it too
# dynamic=None: torch's automatic dynamic shapes (static first, symbolic after a size changes).
COMPILE_KWARGS: dict[str, Any] = {"dynamic": None}
# Device types on which "auto" compiles: none. On CPU (bench/compile.py, docs/compile.md,
# 'Findings') a compiled step costs 12-18% less CPU time, but the cold compile takes 40-150 s, which
# a run pays back only after ~400-650 steps of 64 cells: more than the CPU-sized default runs and
# every CI run of a stage. CUDA is not measured yet, so it stays eager until it is.
AUTO_DEVICES: frozenset[str] = frozenset()
# The block "on" compiles instead of the whole module, by model class (docs/compile.md,
# 'Findings'): the VAE's gene-query block (one decode chunk -> logits) is ~78% of its step, has
# fixed shapes per chunk and compiles in a minute into one graph; the whole VAE loss compiles in
# minutes into a dozen graphs and never reaches that block inside the decode checkpoint
# (torch.utils.checkpoint runs its function with dynamo disabled). Other models: the whole module.
HOT_BLOCKS: dict[type, str] = {VAE: "gene_logits"}
# What to install when the compiler cannot build, by device type.
_TOOLCHAIN = {
    "cpu": "a C++ compiler (g++; or point CXX at one)",
    "cuda": "Triton (pip install triton)",
}


class CompileError(ConfigError):
    """`precision.compile=on` where torch.compile cannot build; the message names the fix."""


def compile_wanted(switch: CompileSwitch, device: torch.device) -> bool:
    """Return True when `switch` asks to compile the model on `device` ("auto": AUTO_DEVICES)."""
    if switch == "auto":
        return device.type in AUTO_DEVICES
    return switch == "on"


def _first_line(exc: BaseException) -> str:
    """The exception as one short line (torch's compile errors span many lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:  # "backend='inductor' raised:" + the error itself
        text = f"{text} {lines[1]}"
    return text if len(text) <= 200 else text[:197] + "..."


def _probe(x: torch.Tensor) -> torch.Tensor:
    return (torch.sin(x) * x + 1.0).sum()


def toolchain_problem(device: torch.device) -> str | None:
    """Compile a small function, run it forward and backward; return None, or why it failed."""
    x = torch.randn(8, device=device, requires_grad=True)
    try:
        torch.compile(_probe, backend=BACKEND, fullgraph=True)(x).backward()
    except Exception as exc:  # any failure to build means: this machine cannot compile
        return _first_line(exc)
    return None


def toolchain_fix(device: torch.device) -> str:
    """What to do when the compiler cannot build anything on `device`."""
    need = _TOOLCHAIN.get(device.type, "the compiler torch.compile needs")
    return f"install {need}, or set precision.compile=off"


# When the compiler builds the probe but not the model: only switching it off helps.
MODEL_FIX = "set precision.compile=off (TORCHDYNAMO_VERBOSE=1 shows where compiling fails)"


def _compile_failed(reason: str, switch: CompileSwitch, fix: str) -> None:
    """Raise CompileError under "on"; under "auto" warn (one line, rank 0) and go eager."""
    if switch == "on":
        raise CompileError(f"precision.compile=on but torch.compile failed: {reason}; {fix}")
    torch.compiler.set_stance("force_eager")  # every compiled call in this process runs eagerly
    if is_main():
        print(
            f"warning: torch.compile failed ({reason}); training continues eagerly "
            f"(precision.compile=auto; {fix})",
            file=sys.stderr,
            flush=True,
        )


def guarded(fn: Callable, switch: CompileSwitch) -> Callable:
    """Return `fn` that, when a call fails under compile, retries it eagerly (see module doc).

    Generators among the arguments and the global CPU generator are rewound before the retry,
    so the eager call draws what the failed one drew.
    """

    fell_back = False  # after a compiler fault under "auto", calls run eagerly (no retry)

    def call(*args: Any) -> Any:
        nonlocal fell_back
        if fell_back:
            return fn(*args)
        gens = [a for a in args if isinstance(a, torch.Generator)]
        states = [g.get_state() for g in gens]
        cpu_rng = torch.get_rng_state()
        try:
            return fn(*args)
        except Exception as exc:
            for gen, state in zip(gens, states, strict=True):
                gen.set_state(state)
            torch.set_rng_state(cpu_rng)
            with torch.compiler.set_stance("force_eager"):
                result = fn(*args)  # the model's own error propagates from here
            _compile_failed(_first_line(exc), switch, MODEL_FIX)
            fell_back = True
            return result

    return call


def this_device() -> torch.device:
    """The device this rank trains on, as `train.distributed.init_distributed` selected it."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def compile_plan(switch: CompileSwitch) -> bool:
    """Return True when the model is to be compiled; probes the compiler first.

    Called before the run writes anything, so that "on" on a machine that cannot compile stops
    with nothing left behind. "auto" warns there (one line) and returns False.

    Raises:
        CompileError: `switch` is "on" and the probe fails.
    """
    device = this_device()
    if not compile_wanted(switch, device):
        return False
    problem = toolchain_problem(device)
    if problem is not None:
        _compile_failed(problem, switch, toolchain_fix(device))
    return problem is None


def hot_block(module: torch.nn.Module) -> str | None:
    """The method of `module` to compile instead of the whole module (HOT_BLOCKS), or None."""
    return next((name for cls, name in HOT_BLOCKS.items() if isinstance(module, cls)), None)


def compile_block(module: torch.nn.Module, name: str, backend: str = BACKEND) -> None:
    """Compile the method `name` of `module` in place.

    The compiled function is set as an instance attribute, which shadows the class's method:
    the module's own calls (`self.<name>(...)`) go through it, while its parameters, state_dict
    and checkpoints stay as they are.
    """
    method = getattr(module, name)
    setattr(module, name, torch.compile(method, backend=backend, **COMPILE_KWARGS))


def compile_engine(engine: Any, stage: Stage, switch: CompileSwitch) -> str:
    """Compile the engine's module in place and guard the stage's calls; return what compiled.

    Call after `compile_plan` said yes. The module's hot block (`hot_block`) is compiled when it
    has one, else the whole module with DeepSpeed's `engine.compile()`. The stage's loss and
    evaluation functions are wrapped with `guarded`, so that a compiler fault on a real batch
    falls back ("auto") or stops ("on"). Returns "" when nothing compiled (fell back).

    Raises:
        CompileError: `switch` is "on" and compiling fails.
    """
    module, block = engine.module, hot_block(engine.module)
    try:
        if block is None:
            engine.compile(backend=BACKEND, compile_kwargs=dict(COMPILE_KWARGS))
        else:
            compile_block(module, block)
    except Exception as exc:  # e.g. a DeepSpeed or torch without compile support
        _compile_failed(_first_line(exc), switch, MODEL_FIX)
        return ""
    stage.loss_fn = guarded(stage.loss_fn, switch)
    if stage.eval_fn is not None:
        stage.eval_fn = guarded(stage.eval_fn, switch)
    what = f"{type(module).__name__}.{block}" if block else "the whole module"
    if is_main():
        print(f"torch.compile ({BACKEND}): {what}; the first steps compile it", flush=True)
    return what

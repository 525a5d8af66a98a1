"""Compile benchmark (issue #14): eager against `torch.compile` on the VAE and DiT training steps.

``python launchers/bench_compile.py [--quick] [--cases NAME,...] [--steps N] [vae.<field>=v ...]``

Shape legend (docs/model.md, 'Notation'): B cells, S expressed genes per cell, T packed tokens
(the sum of S over the batch), G decoded genes, M latent tokens, D latent width.

Every case runs in a fresh process (``python -m atlasldm.bench.compile --worker SPEC``) with one
OpenMP thread, OMP_WAIT_POLICY=PASSIVE, one inductor compile thread and an empty inductor cache,
so each compile is cold. In that process two copies of the model from the same initial weights
train with AdamW on the same stream of batches: the eager twin and the compiled one, both timed
at every step (process CPU-seconds and wall), so each ratio is against an eager comparator under
the same machine load. VAE batches are packed with a different S for every cell (uniform in
[S/2, 3S/2]), so T and the longest cell change from step to step, as in training.

Reported per case: steady step time of both (median over the timed steps after the warm-up),
compile seconds (the compiled first step minus its steady step, wall), graphs compiled on the
first step and recompiles after it, graph breaks, and how far the compiled twin is from the eager
one: loss and gradients after the first step, parameters after ``check_steps`` AdamW steps and
at the end. The last printed line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import yaml

from atlasldm.bench.model_worker import ADAMW
from atlasldm.models.batch import CellBatch
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.flow import flow_loss
from atlasldm.models.vae import VAE, VAEConfig
from atlasldm.progress import Progress
from atlasldm.train.compile import BACKEND, COMPILE_KWARGS, compile_block, hot_block

WORKER_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
WORKER_ENV |= {"TORCHINDUCTOR_COMPILE_THREADS": "1"}  # the compile shares the one core too

# name -> (model, what is compiled, dynamic=, mark T dynamic on every batch). "genes": only the
# decoder's gene-query block (VAE.gene_logits, fixed shapes per chunk), as precision.compile=on
# compiles the VAE; "model": the whole module, as "on" compiles the DiT (train/compile.py).
CASES: dict[str, tuple[str, str, bool | None, bool]] = {
    "vae_genes":         ("vae", "genes", None, False),
    "vae_model":         ("vae", "model", None, False),
    "vae_model_dynamic": ("vae", "model", True, False),
    "vae_model_marked":  ("vae", "model", None, True),
    "dit_model":         ("dit", "model", None, False),
}  # fmt: skip


@dataclass
class Sizes:
    """The models and what to measure; ``--quick`` and ``bench.<field>=`` change these."""

    vae: dict = field(default_factory=lambda: {"num_genes": 2000})  # VAEConfig fields
    dit: dict = field(default_factory=lambda: {"vocab_sizes": [14]})  # DiTConfig fields
    cells: int = 64  # B of both training steps
    expressed: int = 500  # mean S of a VAE cell; each cell draws S uniformly in [S/2, 3S/2]
    check_steps: int = 3  # AdamW steps after which the parameters are compared
    warmup: int = 2  # further untimed steps (recompiles settle)
    steps: int = 8  # timed steps
    device: str = "cpu"  # where the twins train


QUICK_VAE = {"num_genes": 64, "embed_dim": 16, "num_layers": 1, "num_heads": 2}
QUICK_VAE |= {"num_cross_heads": 2, "num_latent_tokens": 4, "latent_dim": 4}
QUICK_DIT = {"vocab_sizes": [3], "embed_dim": 32, "num_layers": 1, "num_heads": 2}
QUICK_DIT |= {"time_freq_dim": 32, "num_latent_tokens": 4, "latent_dim": 4}
QUICK = {"vae": QUICK_VAE, "dit": QUICK_DIT, "cells": 4, "expressed": 8}
QUICK |= {"check_steps": 2, "warmup": 1, "steps": 2}


# ----- one case, in its own process ---------------------------------------------------------------
def varied_cells(cells: int, expressed: int, vocab: int, seed: int) -> CellBatch:
    """Packed batch whose cells hold S ~ U[S/2, 3S/2] distinct tokens in 1..vocab, counts 1..19."""
    g = torch.Generator().manual_seed(seed)
    high = min(vocab, expressed * 3 // 2)  # a cell cannot hold more distinct genes than V
    low = min(max(1, expressed // 2), high)
    lengths = torch.randint(low, high + 1, (cells,), generator=g)  # (B,)
    ids = torch.cat([torch.randperm(vocab, generator=g)[: int(n)] + 1 for n in lengths])  # (T,)
    counts = torch.randint(1, 20, (ids.shape[0],), generator=g).float()  # (T,)
    cu = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)  # (B+1,)
    return CellBatch.from_packed(ids, counts, cu)


def _vae_case(sizes: Sizes, mark: bool) -> tuple[torch.nn.Module, Callable, int]:
    """(VAE, loss(model, step), steps): a new varied batch every step."""
    cfg, device = VAEConfig(**sizes.vae), torch.device(sizes.device)
    total = sizes.check_steps + sizes.warmup + sizes.steps
    batches = [
        varied_cells(sizes.cells, sizes.expressed, cfg.num_genes, seed).to(device)
        for seed in range(total)
    ]

    def loss(model: torch.nn.Module, step: int) -> torch.Tensor:
        batch = batches[step]
        if mark:  # T changes every step: say so before the first compile
            torch._dynamo.mark_dynamic(batch.gene_ids, 0)
            torch._dynamo.mark_dynamic(batch.counts, 0)
        gen = torch.Generator().manual_seed(step)  # as training calls it (train/vae_stage.py)
        return model(batch, None, gen).total

    return VAE(cfg), loss, total


def _dit_case(sizes: Sizes) -> tuple[torch.nn.Module, Callable, int]:
    """(DiT, loss(model, step), steps): flow matching with per-step t, noise and dropout."""
    cfg, device, B = DiTConfig(**sizes.dit), torch.device(sizes.device), sizes.cells
    z = torch.randn(B, cfg.num_latent_tokens, cfg.latent_dim)  # (B, M, D)
    z = F.layer_norm(z, (cfg.latent_dim,)).to(device)
    labels = torch.stack([torch.randint(0, v, (B,)) for v in cfg.vocab_sizes], dim=1)  # (B, A)

    def loss(model: torch.nn.Module, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(step)  # the twins draw the same t, noise, dropout
        return flow_loss(model, z, model.drop_labels(labels, gen).to(device), gen)

    return DiT(cfg), loss, sizes.check_steps + sizes.warmup + sizes.steps


def _compile(model: torch.nn.Module, how: str, dynamic: bool | None, backend: str) -> None:
    """Compile `model` in place: the whole module, or only the VAE's gene-query block."""
    if how == "model":
        model.compile(backend=backend, **(COMPILE_KWARGS | {"dynamic": dynamic}))
    elif how == "genes":  # as precision.compile=on compiles the VAE
        compile_block(model, hot_block(model), backend)
    else:
        raise ValueError(f"unknown compile target {how!r}")


def _graphs() -> int:
    # torch keeps no public count of compiled graphs; dynamo's counters are the only record.
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


class Clock:
    """Wall and process CPU seconds of the steps timed with it (synchronised on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.wall, self.cpu = device, [], []

    def time(self, fn: Callable[[], object]) -> object:
        """Run `fn`, add its seconds to the current step, return its result."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.wall[-1] += time.perf_counter() - wall
        self.cpu[-1] += time.process_time() - cpu
        return out

    def new_step(self) -> None:
        """Start the timing of the next step."""
        self.wall.append(0.0)
        self.cpu.append(0.0)


def _max_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(max |a - b|, that over max |a|) over tensor pairs."""
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
    scale = max(float(x.abs().max()) for x in a)
    return diff, diff / scale if scale else diff


def _rel_l2(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """||a - b|| / ||a|| over all tensors together (robust to a few elements AdamW flipped)."""
    diff = sum(float((x - y).double().square().sum()) for x, y in zip(a, b, strict=True))
    norm = sum(float(x.double().square().sum()) for x in a)
    return (diff / norm) ** 0.5 if norm else diff**0.5


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters()]


def _first_step_equality(eager: torch.nn.Module, compiled: torch.nn.Module, losses) -> dict:
    """Loss and gradient differences of the twins after one forward and backward."""
    loss_e, loss_c = (float(x) for x in losses)
    grad_abs, grad_rel = _max_diff(_grads(eager), _grads(compiled))
    return {
        "loss_rel_diff": abs(loss_c - loss_e) / max(abs(loss_e), 1e-30),
        "grad_max_abs_diff": grad_abs,
        "grad_max_rel_diff": grad_rel,
    }


def train_twins(spec: dict) -> dict:
    """Train the eager and the compiled twin step by step; return timings, graphs and diffs."""
    sizes, (kind, how, dynamic, mark) = Sizes(**spec["sizes"]), CASES[spec["case"]]
    device = torch.device(sizes.device)
    torch.manual_seed(0)
    eager, loss, total = _vae_case(sizes, mark) if kind == "vae" else _dit_case(sizes)
    eager = eager.to(device).train()
    compiled = copy.deepcopy(eager)
    _compile(compiled, how, dynamic, spec["backend"])
    twins = {"eager": (eager, Clock(device)), "compiled": (compiled, Clock(device))}
    opts = {name: torch.optim.AdamW(m.parameters(), **ADAMW) for name, (m, _) in twins.items()}
    out, graphs = {}, []
    for step in range(total):
        losses = []
        for model, clock in twins.values():
            clock.new_step()
            losses.append(clock.time(lambda m=model, s=step: _backward(loss(m, s))))
        if step == 0:
            out |= _first_step_equality(eager, compiled, losses)
        for name, (_, clock) in twins.items():
            clock.time(lambda o=opts[name]: (o.step(), o.zero_grad(set_to_none=True)))
        graphs.append(_graphs())
        if step + 1 == sizes.check_steps:
            out["param_max_abs_diff_check"] = _max_diff(_params(eager), _params(compiled))[0]
    out["param_max_abs_diff_end"] = _max_diff(_params(eager), _params(compiled))[0]
    out["param_rel_l2_diff_end"] = _rel_l2(_params(eager), _params(compiled))
    out |= _summary(twins, graphs, sizes.check_steps + sizes.warmup)
    return out | {"graph_breaks": _graph_breaks(), "steps_total": total}


def _backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()
    return loss.detach()


def _summary(twins: dict, graphs: list[int], first_timed: int) -> dict:
    """Steady medians, the CPU ratio, compile seconds and recompiles from the per-step record."""
    out: dict = {}
    for name, (_, clock) in twins.items():
        out[f"{name}_cpu_s"] = statistics.median(clock.cpu[first_timed:])
        out[f"{name}_wall_s"] = statistics.median(clock.wall[first_timed:])
        out[f"{name}_first_wall_s"] = clock.wall[0]
    out["cpu_ratio"] = out["compiled_cpu_s"] / out["eager_cpu_s"]
    out["wall_ratio"] = out["compiled_wall_s"] / out["eager_wall_s"]
    out["compile_s"] = out["compiled_first_wall_s"] - out["compiled_wall_s"]
    grew = [i for i in range(1, len(graphs)) if graphs[i] > graphs[i - 1]]  # steps that compiled
    wall = twins["compiled"][1].wall
    out["recompile_s"] = sum(wall[i] - out["compiled_wall_s"] for i in grew)
    out["graphs_first_step"] = graphs[0]
    out["recompiles"] = graphs[-1] - graphs[0]  # graphs compiled after the first step
    out["recompile_steps"] = grew
    return out


# ----- the harness ----------------------------------------------------------------------------
def run_worker(spec: dict) -> dict:
    """Run one case in a fresh interpreter with an empty inductor cache; return its JSON line."""
    cache = tempfile.mkdtemp(prefix="bench_compile_")
    env = os.environ | WORKER_ENV | {"TORCHINDUCTOR_CACHE_DIR": cache}
    cmd = [sys.executable, "-m", "atlasldm.bench.compile", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def sizes_from(quick: bool, overrides: Sequence[str]) -> Sizes:
    """The sizes: defaults or QUICK, then ``vae.|dit.|bench.<field>=<YAML value>`` overrides.

    Raises:
        ValueError: an override that is not of that form, or a field or value the config refuses.
    """
    values = dataclasses.asdict(Sizes()) | (copy.deepcopy(QUICK) if quick else {})
    schemas = {"vae": VAEConfig, "dit": DiTConfig, "bench": Sizes}
    for item in overrides:
        key, sep, raw = item.partition("=")
        group, _, name = key.partition(".")
        if not sep or group not in schemas or not name:
            raise ValueError(f"override {item!r} is not vae.|dit.|bench.<field>=<value>")
        names = {f.name for f in dataclasses.fields(schemas[group])} - {"vae", "dit"}
        if name not in names:
            raise ValueError(f"override {item!r}: no {group} field {name!r}")
        (values if group == "bench" else values[group])[name] = yaml.safe_load(raw)
    VAEConfig(**values["vae"])  # ValueError for a value the model refuses
    DiTConfig(**values["dit"])
    return Sizes(**values)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line of `launchers/bench_compile.py`."""
    from atlasldm.cli_parser import Parser

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 5 steps (for CI)")
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}"
    )
    parser.add_argument(
        "--backend",
        default=BACKEND,
        help="torch.compile backend (aot_eager: trace without code generation, for tests)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="vae.<VAEConfig field>=v, dit.<DiTConfig field>=v, bench.<Sizes field>=v (YAML "
        "values: vae.checkpoint_decode=false, dit.vocab_sizes=[14])",
    )
    args = parser.parse_mixed(argv, rest="overrides")
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown or not args.cases:
        parser.error(f"unknown case(s) {unknown or '(none given)'}; choose from {', '.join(CASES)}")
    try:
        args.sizes = sizes_from(args.quick, args.overrides)
    except ValueError as exc:
        parser.error(f"{exc}; check the field names of VAEConfig, DiTConfig and Sizes")
    return args


def _row(case: str, res: dict) -> str:
    """One line of the summary table."""
    if "error" in res:
        return f"{case:<18} error: {res['error']}"
    return (
        f"{case:<18} {res['eager_cpu_s']:8.3f} {res['compiled_cpu_s']:8.3f} "
        f"{res['cpu_ratio']:6.3f} {res['eager_wall_s']:7.3f} {res['compiled_wall_s']:7.3f} "
        f"{res['compile_s']:8.1f} {res['graphs_first_step']:4d} {res['recompiles']:5d} "
        f"{res['graph_breaks']:4d} {res['loss_rel_diff']:9.2e} {res['grad_max_rel_diff']:9.2e} "
        f"{res['param_max_abs_diff_end']:9.2e}"
    )


HEADER = (
    f"{'case':<18} {'eager':>8} {'compiled':>8} {'ratio':>6} {'e_wall':>7} {'c_wall':>7} "
    f"{'compile':>8} {'grph':>4} {'recmp':>5} {'brk':>4} {'loss_rel':>9} {'grad_rel':>9} "
    f"{'param_abs':>9}"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cases, print the table and the final JSON line; ``--worker`` runs one case."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        torch.set_num_threads(1)
        print(json.dumps(train_twins(json.loads(argv[1]))))
        return 0
    args = parse_args(argv)
    sizes = dataclasses.asdict(args.sizes)
    env = {"torch": torch.__version__, "backend": args.backend, "load_start": os.getloadavg()}
    print(
        f"bench_compile quick={args.quick} backend={args.backend} torch={env['torch']} "
        f"load average {env['load_start']}\nsizes: {sizes}",
        flush=True,
    )
    results = {}
    with Progress("bench_compile", total=len(args.cases), unit="cases") as progress:
        for case in args.cases:
            results[case] = run_worker({"case": case, "sizes": sizes, "backend": args.backend})
            progress.update()
    env["load_end"] = os.getloadavg()
    print(
        "step seconds: medians of process CPU (eager, compiled, ratio) and wall; compile = first "
        "step - steady (wall); relative loss and gradient diffs after step 1; max |param diff| at "
        "the end"
    )
    print(HEADER)
    for case, res in results.items():
        print(_row(case, res))
    print(f"load average at end: {env['load_end']}")
    print(json.dumps({"quick": args.quick, "sizes": sizes, "env": env, "cases": results}))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

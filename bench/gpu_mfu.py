"""bf16 training-step MFU of the reference and census70m VAEs and the DiT (docs/gpu.md).

``python -m atlasldm.bench.gpu_mfu [--device cuda|cpu] [--tiny] [--cases NAME ...] [--out FILE]``

MFU = analytic model FLOPs per step (:mod:`atlasldm.models.flops`) / mean step time / the
device's peak dense bf16 FLOP/s (:data:`PEAK_BF16_TFLOPS`; an unknown device gets TFLOP/s and no
MFU unless ``--peak-tflops`` says). A checkpointed decode's recompute is not useful work: it is
counted only in HFU. Each case of :data:`CASES` runs in a fresh process
(:mod:`atlasldm.bench.gpu_mfu_row`), so a crash or an out-of-memory error costs one row: a row
that fails, or whose options the config refuses, is reported with its ``error`` and the run goes
on (exit code 1 at the end). ``--device cpu --tiny`` runs the same code on tiny models so that
CI tests the harness; the JSON keys are the same. The last stdout line is the JSON; ``--out``
also writes it, updated after every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from atlasldm.bench.gpu_mfu_row import decoded_genes
from atlasldm.cli_parser import Parser
from atlasldm.configs import config_path
from atlasldm.models import attention as attn_mod
from atlasldm.models import flops
from atlasldm.models.dit import DiTConfig
from atlasldm.models.vae import VAEConfig
from atlasldm.progress import Progress

ROW_MODULE = "atlasldm.bench.gpu_mfu_row"
# Peak dense bf16 tensor-core TFLOP/s by device name (vendor datasheets; the sparsity figures
# halved). The first name contained in torch.cuda.get_device_name() wins, so variants go first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H200 NVL", 835.5),
    ("H100", 989.4),  # SXM
    ("H200", 989.4),  # SXM: the H100's arithmetic with more memory
    ("A100", 312.0),
)
# name, model, preset (configs/bench_model_<preset>.yaml), options set on its config. Most
# important first: under --budget-s the last rows are the ones skipped.
CASES = (
    ("vae_reference", "vae", "reference", {}),
    ("vae_census70m", "vae", "census70m", {}),
    ("dit", "dit", "reference", {}),
    ("vae_census70m_sampled_2048", "vae", "census70m", {"sampled_zeros": 2048}),
    ("vae_reference_ckpt_true", "vae", "reference", {"checkpoint_decode": "true"}),
    ("vae_reference_ckpt_false", "vae", "reference", {"checkpoint_decode": "false"}),
    ("vae_census70m_ckpt_true", "vae", "census70m", {"checkpoint_decode": "true"}),
    ("vae_census70m_ckpt_false", "vae", "census70m", {"checkpoint_decode": "false"}),
    ("vae_census70m_sampled_512", "vae", "census70m", {"sampled_zeros": 512}),
    ("vae_census70m_sampled_4096", "vae", "census70m", {"sampled_zeros": 4096}),
    ("vae_census70m_sampled_2048_exact", "vae", "census70m",
     {"sampled_zeros": 2048, "sampled_normaliser": "exact"}),
)  # fmt: skip
CASE_NAMES = tuple(case[0] for case in CASES)
# (cells B, expressed genes S) per (model, preset). One H200: the census70m VAE keeps ~40 GB of
# decode activations at B = 64 with checkpoint_decode=false (models/decode_cost.py); the E = 32
# reference VAE and the 16-token DiT need large batches before their matmuls fill the GPU.
SIZES = {
    ("vae", "reference"): (1024, 500),
    ("vae", "census70m"): (64, 2000),
    ("dit", "reference"): (4096, 0),
}
TINY_SIZES = {
    ("vae", "reference"): (4, 8),
    ("vae", "census70m"): (4, 8),
    ("dit", "reference"): (8, 0),
}
# --tiny: the same recipes shrunk, applied as bench_model's vae./dit. overrides.
TINY = {
    "vae": {"num_genes": 64, "embed_dim": 16, "num_layers": 1, "num_heads": 2,
            "num_cross_heads": 2, "num_latent_tokens": 4, "latent_dim": 4, "decode_chunk": 24},
    "dit": {"embed_dim": 32, "num_layers": 1, "num_heads": 2, "time_freq_dim": 32},
}  # fmt: skip
TINY_K_DIVISOR = 256  # sampled_zeros k -> k // 256 on the 64-gene tiny vocabulary
DEFAULTS = {False: {"seconds": 10.0, "warmup": 3}, True: {"seconds": 0.5, "warmup": 1}}  # by --tiny
ROW_KEYS = (
    "name", "model", "preset", "options", "cells", "expressed", "decoded_genes",
    "attention_backend", "decode_checkpointed", "steps", "step_ms", "step_ms_median",
    "cpu_s_per_step", "cells_per_s", "model_flops_per_step", "hardware_flops_per_step",
    "flops_basis", "tflops", "mfu", "hfu", "peak_mem_gb", "loss", "ratio_to_default", "error",
)  # fmt: skip
FROM_WORKER = ("decode_checkpointed", "steps", "step_ms_median", "cpu_s_per_step", "peak_mem_gb")


# ----- environment --------------------------------------------------------------------------
def peak_tflops(device_name: str) -> tuple[float | None, str | None]:
    """Peak dense bf16 TFLOP/s of a device by name, and the table entry that matched."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak, key
    return None, None


def flash_version() -> str | None:
    """The flash-attn version when ``models.attention`` could import it, else None."""
    if attn_mod.flash_attn_varlen_func is None:
        return None
    try:
        return importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def flash_import_error() -> str | None:
    """Why flash-attn does not import (not installed, or built for another torch), else None."""
    if attn_mod.flash_attn_varlen_func is not None:
        return None
    try:
        import flash_attn  # noqa: F401 - only the error matters
    except Exception as exc:  # an ABI mismatch raises OSError or RuntimeError
        return f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    return "flash_attn imports, but models.attention found no flash_attn_varlen_func"


def environment(device: torch.device) -> dict:
    """Torch, CUDA, the device and flash-attn, as the JSON reports them."""
    cuda = device.type == "cuda"
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.machine(),
        "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "flash_attn": flash_version(),
        "flash_attn_error": flash_import_error(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def choose_backend(requested: str | None, device: torch.device) -> tuple[str, str]:
    """The attention backend of every row, and a note that says why."""
    if requested is not None:
        return requested, f"--backend {requested}"
    if device.type == "cuda" and flash_version() is not None:
        return "flash", "flash-attn importable: flash backend"
    why = "flash-attn is not importable" if device.type == "cuda" else "flash needs CUDA"
    return "sdpa", f"{why}: sdpa backend, so no flash figure in this run"


# ----- configs ------------------------------------------------------------------------------
def preset_configs(preset: str, tiny: bool) -> tuple[VAEConfig, DiTConfig, str]:
    """The preset's VAE and DiT through bench_model's build_configs (shrunk with --tiny).

    A machine without the training stack (a bare GPU image has torch and PyYAML, but neither
    omegaconf nor tiledbsoma) reads the same YAML files with :func:`yaml_configs`; a test
    checks that both agree.
    """
    extra = TINY if tiny else {"vae": {}, "dit": {}}
    try:
        from atlasldm.bench.model_presets import build_configs
    except ImportError as exc:
        vae, dit = yaml_configs(preset, extra)
        return vae, dit, f"plain YAML ({exc.name} not importable)"
    lines = [f"{g}.{k}={json.dumps(v)}" for g in ("vae", "dit") for k, v in extra[g].items()]
    vae, dit, _ = build_configs(preset, lines, quick=True)
    return vae, dit, "build_configs"


def _model_section(recipe: str) -> dict:
    """The `model` section of a shipped training recipe."""
    import yaml  # PyYAML: only the fallback needs it

    with open(config_path(recipe)) as f:
        return dict((yaml.safe_load(f) or {}).get("model") or {})


def yaml_configs(preset: str, extra: dict) -> tuple[VAEConfig, DiTConfig]:
    """build_configs' order with plain YAML: recipe `model`, preset `data`, then `extra`."""
    import yaml

    with open(config_path(f"bench_model_{preset}.yaml")) as f:
        spec = yaml.safe_load(f)
    recipes = {"vae": "vae.yaml", "dit": "dit.yaml"} | (spec.get("recipes") or {})
    data = spec["data"]
    vae_kw = _model_section(recipes["vae"]) | {"num_genes": data["num_genes"]} | extra["vae"]
    vae = VAEConfig(**vae_kw)
    tokens = {"num_latent_tokens": vae.num_latent_tokens, "latent_dim": vae.latent_dim}
    dit_kw = _model_section(recipes["dit"]) | tokens | {"vocab_sizes": data["vocab_sizes"]}
    return vae, DiTConfig(**(dit_kw | extra["dit"]))


def apply_options(cfg, options: dict):
    """``cfg`` with ``options`` set; ValueError names a field the config lacks or refuses."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for name, value in options.items():
        if name not in fields:
            raise ValueError(f"{type(cfg).__name__} has no field {name!r}")
        default = fields[name].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{type(cfg).__name__}.{name} is a bool here, not {value!r}")
    return dataclasses.replace(cfg, **options)


def case_options(options: dict, tiny: bool) -> dict:
    """A case's options; --tiny scales sampled_zeros down to the tiny vocabulary."""
    if tiny and "sampled_zeros" in options:
        return options | {"sampled_zeros": max(1, options["sampled_zeros"] // TINY_K_DIVISOR)}
    return dict(options)


# ----- FLOPs --------------------------------------------------------------------------------
def row_flops(model: str, cfg, sizes: tuple[int, int], checkpointed: bool | None) -> dict:
    """Model FLOPs per step (MFU), the same plus the decode recompute (HFU), and their basis."""
    cells, S = sizes
    if model == "dit":
        count = flops.dit_train_flops(cfg).total(cells)
        return {"model": count, "hardware": count, "basis": "dit_train_flops"}
    G = decoded_genes(cfg, S)
    model_flops = flops.vae_train_flops(cfg, S, G).total(cells)
    hardware = flops.vae_train_flops(cfg, S, G, recompute=bool(checkpointed)).total(cells)
    basis = f"vae_train_flops(S={S}, G={G})"
    if cfg.num_genes != G:  # sampled: S + k rows per cell, counted as a decode of S + k genes
        # whose query projections (counted once per step) are per cell for all S + k rows:
        # both the expressed and the drawn genes differ from cell to cell
        per_cell_q = flops.TRAIN_FACTOR * (cells - 1) * G * 2.0 * cfg.embed_dim**2
        model_flops, hardware = model_flops + per_cell_q, hardware + per_cell_q
        basis += " over the S + k sampled rows, all queries projected per cell"
        if getattr(cfg, "sampled_normaliser", "") == "exact":  # + a no-grad forward over all G
            extra = flops.vae_decoder_gene_flops(cfg, cfg.num_genes).total(cells)
            model_flops, hardware = model_flops + extra, hardware + extra
            basis += " + a forward over all G (exact normaliser)"
    return {"model": model_flops, "hardware": hardware, "basis": basis}


# ----- the rows -----------------------------------------------------------------------------
def worker_env(device: str) -> dict[str, str]:
    """The worker's environment: on CPU one OpenMP thread that waits passively (docs/threads.md)."""
    if device != "cpu":
        return dict(os.environ)
    return os.environ | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def run_worker(spec: dict, timeout_s: float) -> dict:
    """Measure one row in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, "-m", ROW_MODULE, json.dumps(spec)]
    env = worker_env(spec["device"])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"worker exit {proc.returncode}: {' | '.join(tail)}"}


def finish_row(row: dict, result: dict, cfg, peak: float | None) -> dict:
    """Fill a row from its worker's result: times, FLOPs, TFLOP/s, MFU and HFU."""
    if "error" in result:
        return row | {"error": result["error"]}
    row = row | {key: result[key] for key in FROM_WORKER}
    step_s, sizes = result["step_s"], (row["cells"], row["expressed"])
    count = row_flops(row["model"], cfg, sizes, row["decode_checkpointed"])
    row["step_ms"] = 1e3 * step_s
    row["cells_per_s"] = row["cells"] / step_s
    row["model_flops_per_step"] = count["model"]
    row["hardware_flops_per_step"] = count["hardware"]
    row["flops_basis"] = count["basis"]
    row["tflops"] = count["model"] / step_s / 1e12
    if peak is not None:
        row["mfu"] = row["tflops"] / peak
        row["hfu"] = count["hardware"] / step_s / 1e12 / peak
    row["loss"] = result["loss"]
    if not math.isfinite(result["loss"]):
        row["error"] = f"non-finite loss {result['loss']}"
    return row


def add_ratios(rows: list[dict]) -> None:
    """step_ms over that of the option-free row of the same model and preset."""
    default = {(r["model"], r["preset"]): r for r in rows if not r["options"]}
    for row in rows:
        base = default.get((row["model"], row["preset"]))
        if base and base["step_ms"] and row["step_ms"]:
            row["ratio_to_default"] = row["step_ms"] / base["step_ms"]


def run_case(case: tuple, args: argparse.Namespace, configs: dict, left_s: float) -> dict:
    """One row: resolve its config, skip it when the budget cannot hold it, measure it."""
    name, model, preset, options = case
    options = case_options(options, args.tiny)
    cells, expressed = (TINY_SIZES if args.tiny else SIZES)[(model, preset)]
    row = dict.fromkeys(ROW_KEYS) | {"name": name, "model": model, "preset": preset}
    row |= {"options": options, "cells": cells, "expressed": expressed}
    vae, dit = configs[preset]
    try:
        cfg = apply_options(vae if model == "vae" else dit, options)
        cfg = dataclasses.replace(cfg, attention_backend=args.backend)
    except ValueError as exc:  # the config refuses these options (e.g. a field not there yet)
        return row | {"error": f"config refused: {exc}"}
    row["decoded_genes"] = decoded_genes(cfg, expressed) if model == "vae" else None
    row["attention_backend"] = cfg.attention_backend
    need = 2 * args.seconds + 30  # start-up, warm-up and the timed steps, with room
    if left_s < need:
        return row | {"error": f"skipped: {left_s:.0f} s of --budget-s left, needs ~{need:.0f}"}
    spec = {
        "name": name,
        "model": model,
        "device": args.device,
        "cells": cells,
        "expressed": expressed,
        "config": dataclasses.asdict(cfg),
        "warmup": args.warmup,
        "seconds": args.seconds,
    }
    result = run_worker(spec, timeout_s=min(left_s, 4 * args.seconds + 180))
    return finish_row(row, result, cfg, args.peak_tflops)


def write_json(path: Path | None, payload: dict) -> None:
    """Replace ``path`` atomically with ``payload`` (never a half-written file)."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def summary_line(row: dict) -> str:
    """One printed line per row."""
    if row["error"]:
        return f"{row['name']}: error: {row['error']}"
    mfu = f", MFU {100 * row['mfu']:.2f}%" if row["mfu"] is not None else ""
    return (
        f"{row['name']}: {row['step_ms']:.2f} ms/step over {row['steps']} steps, "
        f"{row['tflops']:.3g} TFLOP/s{mfu}, backend {row['attention_backend']}"
    )


# ----- command line -------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; a usage mistake is one line and exit code 2."""
    p = Parser(prog="python -m atlasldm.bench.gpu_mfu", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to run")
    p.add_argument("--tiny", action="store_true", help="tiny models (CI: --device cpu --tiny)")
    p.add_argument(
        "--cases",
        nargs="+",
        choices=CASE_NAMES,
        default=list(CASE_NAMES),
        metavar="NAME",
        help=f"rows to measure, of: {' '.join(CASE_NAMES)}",
    )
    p.add_argument("--seconds", type=float, help="timed seconds per row (default 10; tiny 0.5)")
    p.add_argument("--warmup", type=int, help="untimed steps per row (default 3; tiny 1)")
    p.add_argument("--budget-s", type=float, help="skip the rows that no longer fit this total")
    p.add_argument(
        "--backend",
        choices=("flash", "sdpa", "auto"),
        help="attention backend (default: flash if importable on CUDA, else sdpa)",
    )
    p.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s (default: by name)")
    p.add_argument("--out", type=Path, help="also write the JSON here (updated after each row)")
    p.add_argument("--env", action="store_true", help="print the environment JSON only")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.tiny].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    check_args(p, args)
    return args


def check_args(p: Parser, args: argparse.Namespace) -> None:
    """Refuse, in one line each, what cannot run here, before anything is written."""
    if args.device == "cuda" and not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        p.error(
            f"--device cuda: torch {torch.__version__} ({built}) sees no CUDA device; "
            "run on a GPU machine, or use --device cpu --tiny"
        )
    if args.device == "cpu" and not args.tiny and not args.env:
        p.error("--device cpu runs the full-size models for hours; add --tiny")
    if args.backend == "flash" and (args.device != "cuda" or flash_version() is None):
        p.error(
            "--backend flash needs --device cuda and the flash-attn package "
            "(pip install 'atlasldm[flash]'); use --backend sdpa"
        )
    for name in ("seconds", "budget_s", "peak_tflops"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.out is not None and (args.out.is_dir() or not args.out.parent.is_dir()):
        p.error(f"--out {args.out}: not a file in an existing folder; create the folder first")


def header(args: argparse.Namespace, device: torch.device) -> dict:
    """The JSON's run-wide part: environment, backend, peak FLOP/s, settings."""
    env = environment(device)
    args.backend, note = choose_backend(args.backend, device)
    peak, source = peak_tflops(env["device_name"]) if device.type == "cuda" else (None, None)
    if args.peak_tflops is not None:
        peak, source = args.peak_tflops, "--peak-tflops"
    args.peak_tflops = peak
    return {
        "env": env,
        "attention_backend": args.backend,
        "backend_note": note,
        "peak_tflops": peak,
        "peak_source": source,
        "tiny": args.tiny,
        "seconds_per_row": args.seconds,
        "warmup": args.warmup,
        "budget_s": args.budget_s,
    }


def run_rows(args: argparse.Namespace, payload: dict) -> list[dict]:
    """Measure the selected cases in :data:`CASES` order, writing --out after each row."""
    cases = [case for case in CASES if case[0] in args.cases]
    presets = sorted({case[2] for case in cases})
    resolved = {p: preset_configs(p, args.tiny) for p in presets}
    payload["config_source"] = {p: resolved[p][2] for p in presets}
    configs = {p: resolved[p][:2] for p in presets}
    start, rows = time.monotonic(), payload["rows"]
    with Progress("gpu_mfu", total=len(cases), unit="rows") as progress:
        for case in cases:
            left = math.inf if args.budget_s is None else args.budget_s - (time.monotonic() - start)
            rows.append(run_case(case, args, configs, left))
            add_ratios(rows)
            print(summary_line(rows[-1]), flush=True)
            write_json(args.out, payload)
            progress.update(1)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every selected row; print the JSON last; exit 1 if any row failed."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.env:
        env = environment(device)
        write_json(args.out, env)
        print(json.dumps(env))
        return 0
    payload = header(args, device) | {"rows": [], "failed": [], "complete": False}
    print(
        f"gpu_mfu: {payload['env']['device_name']}, torch {torch.__version__}, "
        f"{payload['backend_note']}, peak {payload['peak_tflops']} TFLOP/s",
        flush=True,
    )
    start = time.monotonic()
    rows = run_rows(args, payload)
    payload["failed"] = [row["name"] for row in rows if row["error"]]
    payload |= {"complete": True, "wall_s": time.monotonic() - start}
    write_json(args.out, payload)
    print(json.dumps(payload))
    return 1 if payload["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Model benchmark (issue #3): parameters, analytic FLOPs, CPU step time and peak memory.

``python launchers/bench_model.py [--preset reference|census70m] [--quick] [key=value ...]``
with overrides ``vae.<field>=``, ``dit.<field>=`` (dataclass fields of ``VAEConfig`` and
``DiTConfig``; lists comma-separated) and ``bench.<field>=`` (:class:`BenchSettings`).

Every measurement runs in a fresh subprocess (:mod:`train.bench_worker`), so import and setup
costs stay out of the timings and peak memories do not mix. Memory is the growth of the peak
resident set over the timed steps, from the RSS right before them (kernel peak mark reset there;
see the worker): activations, gradients and transient buffers; the warm-up step's growth, which
also holds the AdamW state and one-time runtime set-up, is reported as ``first_step_mb``. The
last printed line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from atlasldm.models import flops
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.skip_mlp import SkipMLP, SkipMLPConfig
from atlasldm.models.vae import VAE, VAEConfig

MEMORY_METHOD = (
    "peak RSS (VmHWM) over the timed steps minus RSS before them, after malloc_trim and a "
    "peak-mark reset (/proc/self/clear_refs); one fresh subprocess per measurement"
)
# Fixed threshold: buffers >= 128 KiB are mmapped and unmapped on free, so the decoder scan's
# RSS follows live memory instead of glibc's dynamic-threshold heap reuse.
DECODER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
_WORKER = "import sys; from atlasldm.train.bench_worker import main; sys.exit(main(sys.argv[1:]))"


@dataclass
class BenchSettings:
    """What to measure; preset defaults below, ``bench.<field>=`` overrides."""

    train_cells: int = 32  # B of the VAE training-step measurement
    train_expressed: int = 500  # S: expressed genes per synthetic cell (encoder set size)
    train_genes: int = 0  # G decoded in the VAE training step; 0 = the whole vocabulary
    dit_cells: int = 32  # B of the DiT training-step measurement
    warmup: int = 1  # untimed steps before timing
    steps: int = 3  # timed steps
    enc_cells: int = 16  # B of the encoder scan
    enc_genes: list[int] = field(default_factory=lambda: [256, 1024, 4096])  # S values
    max_genes: int = 8192  # padded length of the padded encoder path (REF Census: 8,000)
    enc_reps: int = 5  # timed encoder forwards per S and layout (the best one is reported)
    dec_cells: int = 8  # B of the decoder memory scan
    dec_genes: list[int] = field(default_factory=lambda: [2000, 8192, 36130])  # G values
    dec_chunk: int = 4096  # decode_chunk of the chunked (checkpointed) decoder


# Per preset: (VAEConfig fields, DiTConfig fields, BenchSettings fields). The census figures use
# B = 2-4 cells and 4,096 decoded genes in the training step so that a CPU run takes minutes.
PRESETS: dict[str, tuple[dict, dict, dict]] = {
    "reference": ({"num_genes": 2000}, {"vocab_sizes": [14]}, {}),
    "census70m": (
        {"num_genes": 36130, "embed_dim": 512, "num_heads": 8, "num_cross_heads": 8},
        {"vocab_sizes": [14]},
        {
            "train_cells": 4,
            "train_expressed": 2000,
            "train_genes": 4096,
            "steps": 2,
            "enc_cells": 4,
            "enc_reps": 5,
            "dec_cells": 2,
        },
    ),
}


def _parse_value(raw: str, current: object) -> object:
    """Convert ``raw`` to the type of the field's current value."""
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected a boolean, got {raw!r}")
        return raw.lower() in ("true", "1")
    if isinstance(current, (list, tuple)):
        return [int(v) for v in raw.split(",") if v]
    if isinstance(current, (int, float)):
        return type(current)(raw)
    return raw


def apply_overrides(
    vae: VAEConfig, dit: DiTConfig, bench: BenchSettings, overrides: Sequence[str]
) -> tuple[VAEConfig, DiTConfig, BenchSettings]:
    """Apply ``vae.k=v`` / ``dit.k=v`` / ``bench.k=v`` overrides; unknown keys raise."""
    objs = {"vae": vae, "dit": dit, "bench": bench}
    for item in overrides:
        key, sep, raw = item.partition("=")
        group, _, name = key.partition(".")
        if not sep or group not in objs:
            raise ValueError(f"override {item!r}: expected vae.|dit.|bench.<field>=<value>")
        obj = objs[group]
        if name not in {f.name for f in dataclasses.fields(obj)}:
            raise ValueError(f"override {item!r}: {type(obj).__name__} has no field {name!r}")
        objs[group] = dataclasses.replace(obj, **{name: _parse_value(raw, getattr(obj, name))})
    return objs["vae"], objs["dit"], objs["bench"]


def build_configs(
    preset: str, overrides: Sequence[str], quick: bool
) -> tuple[VAEConfig, DiTConfig, BenchSettings]:
    """Preset -> configs; the DiT's M and D follow the (overridden) VAE unless set explicitly."""
    vae_kw, dit_kw, bench_kw = PRESETS[preset]
    bench = BenchSettings(**bench_kw)
    if quick:
        bench = dataclasses.replace(bench, warmup=1, steps=min(bench.steps, 2), enc_reps=2)
    dit_overrides = [o for o in overrides if o.startswith("dit.")]
    rest = [o for o in overrides if not o.startswith("dit.")]
    vae, _, bench = apply_overrides(VAEConfig(**vae_kw), DiTConfig(**dit_kw), bench, rest)
    tokens = {"latent_tokens": vae.num_inducing_points, "latent_dim": vae.latent_dim}
    _, dit, _ = apply_overrides(vae, DiTConfig(**(tokens | dit_kw)), bench, dit_overrides)
    return vae, dit, bench


def count_parameters(vae_cfg: VAEConfig, dit_cfg: DiTConfig) -> dict[str, int]:
    """Parameter counts (frozen position tables included, as in REF's published counts)."""
    torch.manual_seed(0)
    vae, dit = VAE(vae_cfg), DiT(dit_cfg)
    skip = SkipMLP(
        SkipMLPConfig(
            latent_tokens=dit_cfg.latent_tokens,
            latent_dim=dit_cfg.latent_dim,
            vocab_sizes=list(dit_cfg.vocab_sizes),
        )
    )
    table = vae.input_layer.gene_embedding.weight.numel()
    theta = vae.decoder_head.theta.weight.numel() if vae.decoder_head.theta is not None else 0
    total = sum(p.numel() for p in vae.parameters())
    return {
        "vae_total": total,
        "vae_gene_table": table,
        "vae_theta_table": theta,
        "vae_transformer_and_heads": total - table - theta,
        "dit": sum(p.numel() for p in dit.parameters()),
        "skip_mlp": sum(p.numel() for p in skip.parameters()),
    }


def flop_summary(vae: VAEConfig, dit: DiTConfig, bench: BenchSettings) -> dict:
    """Analytic FLOPs: linear forms in S and G, and values at the benchmark's S and G."""
    G = vae.num_genes
    train = flops.vae_linear_form(vae, flops.TRAIN_FACTOR)
    recompute = flops.vae_decoder_gene_flops(vae, 1).cell_total()
    at = {}
    for S in bench.enc_genes:
        count = flops.vae_train_flops(vae, S, G)
        enc = sum(v for k, v in count.per_cell.items() if k.startswith("enc."))
        at[str(S)] = {"per_cell": count.cell_total(), "encoder_share": enc / count.cell_total()}
    return {
        "vae_train_per_cell_linear": train,
        "vae_recompute_per_G": recompute,
        "vae_train_per_cell_at_G_vocab": at,
        "dit_train_per_cell": flops.dit_train_flops(dit).cell_total(),
    }


def run_worker(spec: dict, env: dict[str, str] | None = None) -> dict:
    """Run one measurement in a fresh interpreter; its last stdout line is a JSON result."""
    cmd = [sys.executable, "-c", _WORKER, json.dumps(spec)]
    full_env = os.environ | (env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=full_env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def measure(vae: VAEConfig, dit: DiTConfig, bench: BenchSettings) -> dict:
    """Every subprocess measurement: training steps, encoder scan, decoder memory scan."""
    base = {"vae": dataclasses.asdict(vae), "bench": dataclasses.asdict(bench)}
    out: dict = {"train_vae": run_worker(base | {"task": "train_vae"})}
    out["train_dit"] = run_worker(base | {"task": "train_dit", "dit": dataclasses.asdict(dit)})
    out["encoder"] = run_worker(base | {"task": "encoder"})
    rows = []
    for G in bench.dec_genes:
        row: dict = {"G": G}
        for mode in ("chunked", "unchunked"):
            spec = base | {"task": "decoder", "genes": G, "mode": mode}
            res = run_worker(spec, DECODER_ENV)
            row[mode] = res
        a, b = row["chunked"].get("peak_rss_delta_mb"), row["unchunked"].get("peak_rss_delta_mb")
        row["unchunked_over_chunked"] = b / a if a and b else None
        rows.append(row)
    out["decoder"] = rows
    return out


def add_achieved_rates(vae: VAEConfig, dit: DiTConfig, bench: BenchSettings, m: dict) -> None:
    """Add each training step's analytic FLOPs (hardware: with recompute) and GFLOP/s to m."""
    G = min(bench.train_genes or vae.num_genes, vae.num_genes)
    vae_step = flops.vae_train_flops(vae, bench.train_expressed, G, vae.checkpoint_decode)
    steps = {
        "train_vae": vae_step.total(bench.train_cells),
        "train_dit": flops.dit_train_flops(dit).total(bench.dit_cells),
    }
    for key, step_flops in steps.items():
        if "error" not in m[key]:
            m[key]["analytic_step_flops"] = step_flops
            m[key]["achieved_gflops"] = step_flops / m[key]["s_per_step"] / 1e9


def add_encoder_flops(vae: VAEConfig, bench: BenchSettings, enc: dict) -> None:
    """Add the analytic encoder forward FLOPs per cell of both layouts to the scan's rows."""
    for row in enc.get("rows", []):
        packed = flops.vae_encoder_flops(vae, row["S"]).total(bench.enc_cells) / bench.enc_cells
        padded = flops.vae_encoder_flops(vae, row["padded_len"])
        row["analytic_packed_flops"] = packed
        row["analytic_padded_flops"] = padded.total(bench.enc_cells) / bench.enc_cells
        row["analytic_ratio"] = row["analytic_padded_flops"] / packed


def _fmt_train(res: dict) -> str:
    if "error" in res:
        return f"FAILED ({res['error']})"
    first = res["first_step_mb"]
    return (
        f"{res['cells_per_s']:.2f} cells/s, {res['s_per_step']:.3f} s/step, "
        f"peak RSS +{res['peak_rss_delta_mb']:.0f} MB"
        + (f" (warm-up step +{first:.0f} MB)" if first is not None else "")
        + f", ≈{res['achieved_gflops']:.1f} GFLOP/s (analytic FLOPs / time)"
    )


def report(preset: str, vae: VAEConfig, res: dict) -> None:
    """Print parameter counts and analytic FLOPs (the JSON line follows separately)."""
    p, f = res["params"], res["flops"]
    print(f"== parameters ({preset}) ==")
    print(
        f"VAE total {p['vae_total']:,} (gene table {p['vae_gene_table']:,}, θ table "
        f"{p['vae_theta_table']:,}, transformer + heads {p['vae_transformer_and_heads']:,})"
    )
    print(f"DiT {p['dit']:,}; skip-MLP {p['skip_mlp']:,}")
    lin = f["vae_train_per_cell_linear"]
    print("== analytic FLOPs (matmuls only, 2·m·n·k; training = 3 x forward) ==")
    print(
        f"VAE train FLOPs per cell = {lin['per_S']:.4g}·S + {lin['per_G']:.4g}·G + "
        f"{lin['const']:.4g}   (S expressed genes encoded, G genes decoded)"
    )
    print(
        f"  + per micro-batch (hoisted gene queries, inducing points): "
        f"{lin['step_per_G']:.4g}·G + {lin['step_const']:.4g}"
    )
    print(f"  + checkpointed decode recompute (hardware FLOPs): {f['vae_recompute_per_G']:.4g}·G")
    for S, v in f["vae_train_per_cell_at_G_vocab"].items():
        print(
            f"  S={S}, G={vae.num_genes}: {v['per_cell'] / 1e9:.3f} GFLOP/cell "
            f"(encoder {100 * v['encoder_share']:.1f}%)"
        )
    dit_mflop = f["dit_train_per_cell"] / 1e6
    print(f"DiT train FLOPs per cell = {dit_mflop:.1f} MFLOP (independent of S, G; z is given)")


def _report_measurements(vae: VAEConfig, bench: BenchSettings, res: dict) -> None:
    m, threads = res["measured"], res["env"]["threads"]
    print(f"== measured on CPU ({threads} threads, fwd + bwd + AdamW; memory: {MEMORY_METHOD}) ==")
    G = min(bench.train_genes or vae.num_genes, vae.num_genes)
    print(
        f"VAE B={bench.train_cells} S={bench.train_expressed} G={G}: {_fmt_train(m['train_vae'])}"
    )
    print(f"DiT B={bench.dit_cells}: {_fmt_train(m['train_dit'])}")
    print(
        f"== encoder forward per cell (no grad, best of {bench.enc_reps}), B={bench.enc_cells}: "
        f"packed varlen (CPU reference path) vs padded to {bench.max_genes} =="
    )
    enc = m["encoder"]
    if "error" in enc:
        print(f"FAILED ({enc['error']})")
    elif enc["vocab"] != vae.num_genes:
        print(f"(scan model built with a {enc['vocab']}-gene vocabulary to hold S distinct genes)")
    for r in enc.get("rows", []):
        print(
            f"S={r['S']:>6}: packed {r['packed_ms_per_cell']:.3f} ms, padded "
            f"{r['padded_ms_per_cell']:.3f} ms, padded/packed {r['ratio']:.2f} "
            f"(analytic FLOPs: {r['analytic_packed_flops'] / 1e6:.1f} vs "
            f"{r['analytic_padded_flops'] / 1e6:.1f} MFLOP/cell, {r['analytic_ratio']:.2f})"
        )
    print(
        f"== decoder fwd + bwd of the loss, B={bench.dec_cells}: peak RSS growth, chunked "
        f"({bench.dec_chunk}, checkpointed) vs unchunked =="
    )
    for r in m["decoder"]:
        parts = []
        for mode in ("chunked", "unchunked"):
            x = r[mode]
            parts.append(
                f"{mode} FAILED ({x['error']})"
                if "error" in x
                else f"{mode} +{x['peak_rss_delta_mb']:.0f} MB ({x['s_per_step']:.2f} s)"
            )
        ratio = r["unchunked_over_chunked"]
        print(
            f"G={r['G']:>6}: "
            + ", ".join(parts)
            + (f", unchunked/chunked {ratio:.2f}" if ratio else "")
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, count, measure, print the summary and the final JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reference")
    parser.add_argument("--quick", action="store_true", help="fewer warm-up/timed steps")
    parser.add_argument("--no-measure", action="store_true", help="counts and FLOPs only")
    parser.add_argument("overrides", nargs="*", help="vae.k=v, dit.k=v, bench.k=v")
    args = parser.parse_args(argv)
    vae, dit, bench = build_configs(args.preset, args.overrides, args.quick)
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
    }
    print(
        f"bench_model preset={args.preset} quick={args.quick} torch={env['torch']} "
        f"threads={env['threads']} load average {env['loadavg_start']}"
    )
    print(f"VAEConfig: {dataclasses.asdict(vae)}")
    print(f"DiTConfig: {dataclasses.asdict(dit)}")
    print(f"BenchSettings: {dataclasses.asdict(bench)}")
    res: dict = {"params": count_parameters(vae, dit), "flops": flop_summary(vae, dit, bench)}
    res["env"] = env
    res["measured"] = None if args.no_measure else measure(vae, dit, bench)
    if res["measured"] is not None:
        add_achieved_rates(vae, dit, bench, res["measured"])
        add_encoder_flops(vae, bench, res["measured"]["encoder"])
    env["loadavg_end"] = list(os.getloadavg())
    report(args.preset, vae, res)
    if res["measured"] is not None:
        _report_measurements(vae, bench, res)
    print(f"load average at end: {env['loadavg_end']}")
    out = {"preset": args.preset, "quick": args.quick, "memory_method": MEMORY_METHOD}
    out |= {"vae_config": dataclasses.asdict(vae), "dit_config": dataclasses.asdict(dit)}
    out |= {"settings": dataclasses.asdict(bench), "env": env, "params": res["params"]}
    out |= {"flops": res["flops"], "measured": res["measured"]}
    print(json.dumps(out))
    return 0

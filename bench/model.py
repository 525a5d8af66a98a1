"""Model benchmark (issue #3): parameters, analytic FLOPs, CPU step time and peak memory.

``python launchers/bench_model.py [--preset reference|census70m] [--quick] [key=value ...]``
with overrides ``vae.<field>=``, ``dit.<field>=`` (dataclass fields of ``VAEConfig`` and
``DiTConfig``; lists comma-separated) and ``bench.<field>=`` (``BenchSettings``). Presets are
YAML files under configs/ (:mod:`atlasldm.bench.model_presets`).

Every measurement runs in a fresh subprocess (:mod:`atlasldm.bench.model_worker`), so import
and setup costs stay out of the timings and peak memories do not mix. Memory is the growth of
the peak resident set over the timed steps, from the RSS right before them (kernel peak mark
reset there; see the worker): activations, gradients and transient buffers; the warm-up step's
growth, which also holds the AdamW state and one-time runtime set-up, is reported as
``first_step_mb``. The last printed line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence

import torch

from atlasldm.bench.model_presets import BenchSettings, build_configs, preset_names
from atlasldm.bench.model_report import MEMORY_METHOD, report, report_measurements
from atlasldm.models import flops
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.skip_mlp import SkipMLP, SkipMLPConfig
from atlasldm.models.vae import VAE, VAEConfig

# Fixed threshold: buffers >= 128 KiB are mmapped and unmapped on free, so the decoder scan's
# RSS follows live memory instead of glibc's dynamic-threshold heap reuse.
DECODER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
# One OpenMP thread that sleeps when idle: busy-waiting threads on a shared host make step times
# 2-12x worse and noisy; figures are per process.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MKL_NUM_THREADS": "1"}
TODAY = {"checkpoint_decode": "true", "sampled_zeros": 0}  # the decode before issue #14
WORKER_MODULE = "atlasldm.bench.model_worker"


def count_parameters(vae_cfg: VAEConfig, dit_cfg: DiTConfig) -> dict[str, int]:
    """Parameter counts (frozen position tables included, as in REF's published counts)."""
    torch.manual_seed(0)
    vae, dit = VAE(vae_cfg), DiT(dit_cfg)
    skip = SkipMLP(
        SkipMLPConfig(
            num_latent_tokens=dit_cfg.num_latent_tokens,
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
    cmd = [sys.executable, "-m", WORKER_MODULE, json.dumps(spec)]
    full_env = os.environ | WORKER_ENV | (env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=full_env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def decoder_scan(base: dict, bench: BenchSettings) -> list[dict]:
    """Decoder memory, chunked (checkpointed) and unchunked, for every G of the scan."""
    rows = []
    for G in bench.dec_genes:
        row: dict = {"G": G}
        for mode in ("chunked", "unchunked"):
            spec = base | {"task": "decoder", "genes": G, "mode": mode}
            row[mode] = run_worker(spec, DECODER_ENV)
        a, b = row["chunked"].get("peak_rss_delta_mb"), row["unchunked"].get("peak_rss_delta_mb")
        row["unchunked_over_chunked"] = b / a if a and b else None
        rows.append(row)
    return rows


def comparison_variants(bench: BenchSettings) -> list[tuple[str, dict]]:
    """(label, VAEConfig overrides) of the decode comparison; the first is the baseline."""
    rows = [("today: checkpointed full decode", TODAY), ("new defaults", {})]
    for k in bench.compare_ks:
        rows.append((f"sampled k={k}", {"sampled_zeros": k, "sampled_normaliser": "estimated"}))
    k = bench.compare_ks[len(bench.compare_ks) // 2] if bench.compare_ks else 0
    if k:
        rows.append((f"sampled k={k} exact", {"sampled_zeros": k, "sampled_normaliser": "exact"}))
    return rows


def decode_comparison(base: dict, bench: BenchSettings) -> list[dict]:
    """VAE training step at each G of the comparison, for every variant, with ratios to today's."""
    out = []
    for G, S in zip(bench.compare_genes, bench.compare_expressed, strict=True):
        shape = {"train_cells": bench.compare_cells, "train_expressed": S, "train_genes": 0}
        row: dict = {"G": G, "S": S, "B": bench.compare_cells, "variants": {}}
        for label, fields in comparison_variants(bench):
            spec = base | {"task": "train_vae", "bench": base["bench"] | shape}
            spec["vae"] = base["vae"] | {"num_genes": G} | fields
            row["variants"][label] = run_worker(spec)
        first = next(iter(row["variants"].values()))
        for res in row["variants"].values():
            if "error" not in res and "error" not in first:
                res["today_over_this"] = first["cpu_s_per_step"] / res["cpu_s_per_step"]
        out.append(row)
    return out


def measure(vae: VAEConfig, dit: DiTConfig, bench: BenchSettings) -> dict:
    """Every subprocess measurement: training steps, encoder scan, decoder memory scan."""
    base = {"vae": dataclasses.asdict(vae), "bench": dataclasses.asdict(bench)}
    out: dict = {"train_vae": run_worker(base | {"task": "train_vae"})}
    out["train_dit"] = run_worker(base | {"task": "train_dit", "dit": dataclasses.asdict(dit)})
    out["encoder"] = run_worker(base | {"task": "encoder"})
    out["decoder"] = decoder_scan(base, bench)
    out["decode_comparison"] = decode_comparison(base, bench)
    return out


def add_achieved_rates(vae: VAEConfig, dit: DiTConfig, bench: BenchSettings, m: dict) -> None:
    """Add each training step's analytic FLOPs (hardware: with recompute) and GFLOP/s to m."""
    G = min(bench.train_genes or vae.num_genes, vae.num_genes)
    recompute = bool(m["train_vae"].get("checkpointed"))
    vae_step = flops.vae_train_flops(vae, bench.train_expressed, G, recompute)
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of `launchers/bench_model.py`."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--preset",
        choices=preset_names(),
        default="reference",
        help="model sizes and data shape: configs/bench_model_<preset>.yaml",
    )
    parser.add_argument("--quick", action="store_true", help="fewer warm-up/timed steps")
    parser.add_argument("--no-measure", action="store_true", help="counts and FLOPs only")
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="vae.<VAEConfig field>=v, dit.<DiTConfig field>=v, bench.<BenchSettings field>=v "
        "(lists comma-separated)",
    )
    return parser.parse_args(argv)


def print_header(args: argparse.Namespace, configs: tuple, env: dict) -> None:
    """The run's first lines: preset, torch, threads, load, and the three resolved configs."""
    vae, dit, bench = configs
    print(
        f"bench_model preset={args.preset} quick={args.quick} torch={env['torch']} "
        f"threads={env['threads']} load average {env['loadavg_start']}"
    )
    print(f"VAEConfig: {dataclasses.asdict(vae)}")
    print(f"DiTConfig: {dataclasses.asdict(dit)}")
    print(f"BenchSettings: {dataclasses.asdict(bench)}")


def run(vae: VAEConfig, dit: DiTConfig, bench: BenchSettings, do_measure: bool) -> dict:
    """Counts, analytic FLOPs and (when `do_measure`) the subprocess measurements."""
    res: dict = {"params": count_parameters(vae, dit), "flops": flop_summary(vae, dit, bench)}
    res["measured"] = measure(vae, dit, bench) if do_measure else None
    if res["measured"] is not None:
        add_achieved_rates(vae, dit, bench, res["measured"])
        add_encoder_flops(vae, bench, res["measured"]["encoder"])
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, count, measure, print the summary and the final JSON line."""
    args = parse_args(argv)
    vae, dit, bench = build_configs(args.preset, args.overrides, args.quick)
    env = {
        "torch": torch.__version__,
        "threads": int(WORKER_ENV["OMP_NUM_THREADS"]),  # per measuring process
        "loadavg_start": list(os.getloadavg()),
    }
    print_header(args, (vae, dit, bench), env)
    res = run(vae, dit, bench, not args.no_measure) | {"env": env}
    env["loadavg_end"] = list(os.getloadavg())
    report(args.preset, vae, res)
    if res["measured"] is not None:
        report_measurements(vae, bench, res)
    print(f"load average at end: {env['loadavg_end']}")
    out = {"preset": args.preset, "quick": args.quick, "memory_method": MEMORY_METHOD}
    out |= {"vae_config": dataclasses.asdict(vae), "dit_config": dataclasses.asdict(dit)}
    out |= {"settings": dataclasses.asdict(bench), "env": env, "params": res["params"]}
    out |= {"flops": res["flops"], "measured": res["measured"]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

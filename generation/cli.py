"""Command line of generation: exports in, an .h5ad or SOMA Experiment of generated cells out.

Examples::

    # 200 cells of each of two cell types, joint CFG with weight 2
    python launchers/generate.py --vae runs/vae/export --denoiser runs/dit/export \\
        --condition "cell_type=CD14+ Monocyte" --condition "cell_type=CD19+ B" --n-cells 200 \\
        --cfg-weight cell_type=2 --out gen.h5ad
    # match a held-out set (same cells per condition, its library sizes), three seeds
    python launchers/generate.py --vae ... --denoiser ... --match test.h5ad --seeds 0 1 2 \\
        --out g.h5ad
    # trajectory between two cell types in 5 steps, classifier-guided
    python launchers/generate.py --vae ... --denoiser ... --classifier runs/classifier/export \\
        --interpolate "cell_type=CD14+ Monocyte:CD19+ B" --interp-steps 5 --n-cells 50 --out t.h5ad

Launched with several processes (`torchrun --nproc_per_node N launchers/generate.py ...`), each
rank generates every N-th batch; the output is identical to a single process's.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from tqdm import tqdm

from atlasldm.generation.encode import encode_cells
from atlasldm.generation.models import Exports, load_exports
from atlasldm.generation.plan import (
    LibrarySizes,
    Plan,
    grid_plan,
    interpolation_plan,
    match_plan,
    parse_conditions,
)
from atlasldm.generation.sampling import GuidanceConfig, check_guidance, decode, sample_latents
from atlasldm.generation.vocabulary import ConditionError
from atlasldm.generation.writers import (
    Part,
    assemble,
    create_soma,
    finish_soma,
    write_h5ad_atomic,
    write_soma_part,
)
from atlasldm.models.flow import SAMPLERS, FlowConfig
from atlasldm.models.pretrained import ExportError

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the parsed command line."""
    p = argparse.ArgumentParser(description="Generate cells from exported scLDM models.")
    for add_group in (_model_args, _request_args, _sampler_args, _output_args):
        add_group(p)
    return p.parse_args(argv)


def _model_args(p: argparse.ArgumentParser) -> None:
    """Add the 'models' options."""
    m = p.add_argument_group("models")
    m.add_argument("--vae", required=True, type=Path, help="VAE export folder")
    m.add_argument("--denoiser", type=Path, help="DiT / skip-MLP export (absent: VAE prior)")
    m.add_argument(
        "--classifier",
        type=Path,
        action="append",
        default=[],
        help="noisy-latent classifier export (repeatable, one per attribute)",
    )


def _request_args(p: argparse.ArgumentParser) -> None:
    """Add the 'what to generate' options."""
    w = p.add_argument_group("what to generate")
    w.add_argument(
        "--condition",
        action="append",
        default=[],
        metavar="ATTR=VALUE",
        help="condition value (repeatable; VALUE '*' = every value); cells are made "
        "for every combination",
    )
    w.add_argument("--n-cells", type=int, default=100, help="cells per combination (per α)")
    w.add_argument("--match", type=Path, help="reference .h5ad: its cells' conditions and sizes")
    w.add_argument("--match-keys", nargs="*", help="obs columns to match (default: conditioned)")
    w.add_argument(
        "--library-size",
        default="auto",
        help="'auto' (reference with --match, else statistics), 'stats', 'reference', "
        "an obs column name of the reference, or a number",
    )
    w.add_argument("--interpolate", metavar="ATTR=A:B", help="trajectory between two values")
    w.add_argument("--interp-steps", type=int, default=5, help="α values from 0 to 1")
    w.add_argument("--interp-method", choices=["auto", "cfg", "classifier"], default="auto")
    w.add_argument(
        "--interp-source",
        type=Path,
        help=".h5ad of real cells; those with value A start the trajectory",
    )
    w.add_argument("--t-start", type=float, default=0.1, help="noise level of --interp-source")


def _sampler_args(p: argparse.ArgumentParser) -> None:
    """Add the 'guidance and sampler' options."""
    g = p.add_argument_group("guidance and sampler")
    g.add_argument("--cfg-mode", choices=["joint", "additive"], default="")
    g.add_argument("--cfg-weight", action="append", default=[], metavar="ATTR=W")
    g.add_argument("--classifier-scale", action="append", default=[], metavar="ATTR=S")
    g.add_argument("--t-min", type=float, default=0.05)
    g.add_argument("--max-factor", type=float, default=20.0)
    g.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default=None,
        help="default dopri5; euler with classifier guidance",
    )
    g.add_argument("--steps", type=int, default=50, help="steps of euler / heun")
    g.add_argument("--atol", type=float, default=1e-5)
    g.add_argument("--rtol", type=float, default=1e-5)


def _output_args(p: argparse.ArgumentParser) -> None:
    """Add the 'output' options."""
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, type=Path, help=".h5ad file or SOMA folder")
    o.add_argument("--format", choices=["h5ad", "soma"], default=None, help="default: by suffix")
    o.add_argument("--no-means", action="store_true", help="leave out the decoded-means layer")
    o.add_argument("--seeds", nargs="+", type=int, default=[0])
    o.add_argument("--batch-size", type=int, default=256)
    o.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")


def _pairs(specs: list[str], flag: str) -> dict[str, float]:
    out = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise ConditionError(f"{flag} expects ATTR=NUMBER, got {spec!r}")
    return out


def guidance_config(args: argparse.Namespace) -> GuidanceConfig:
    """Return the guidance options of the command line (checked later against the exports)."""
    return GuidanceConfig(
        args.cfg_mode,
        _pairs(args.cfg_weight, "--cfg-weight"),
        _pairs(args.classifier_scale, "--classifier-scale"),
        args.t_min,
        args.max_factor,
        args.interp_method,
    )


def library_mode(text: str, has_match: bool) -> tuple[str, float | str | None]:
    """Return --library-size as ("fixed", ℓ), ("stats", None) or ("reference", obs column)."""
    try:
        return "fixed", float(text)
    except ValueError:
        pass
    if text == "auto":
        text = "reference" if has_match else "stats"
    if text == "stats":
        return "stats", None
    if not has_match:
        raise ConditionError(f"--library-size {text} takes sizes from a reference: add --match")
    return "reference", None if text == "reference" else text


def build_plan(args: argparse.Namespace, ex: Exports) -> Plan:
    """Return the plan of the request (grid, match or trajectory)."""
    conditions = parse_conditions(args.condition, ex.vocab)
    mode, value = library_mode(args.library_size, args.match is not None)
    libs = None
    if mode != "reference":
        libs = LibrarySizes(ex.libsize_stats, value if mode == "fixed" else None)
    if args.match is not None:
        if conditions or args.interpolate:
            raise ConditionError("--match cannot be combined with --condition or --interpolate")
        reference = ad.read_h5ad(args.match)
        keys = args.match_keys if args.match_keys is not None else ex.conditioned
        return match_plan(
            reference, keys, args.seeds, ex.vocab, libs, value if libs is None else None
        )
    if args.interpolate:
        return interpolation_plan(
            args.interpolate,
            args.interp_steps,
            args.n_cells,
            conditions,
            args.seeds,
            ex.vocab,
            libs,
        )
    return grid_plan(conditions, args.n_cells, args.seeds, libs)


def batch_generators(plan: Plan, batches: list[np.ndarray]) -> list[tuple[int, int]]:
    """Return per batch (plan seed, index among that seed's batches): its RNG stream's key."""
    counts: dict[int, int] = {}
    keys = []
    for b in batches:
        seed = int(plan.seed[b[0]])
        keys.append((seed, counts.get(seed, 0)))
        counts[seed] = counts.get(seed, 0) + 1
    return keys


def generator_of(key: tuple[int, int]) -> torch.Generator:
    """Return the CPU generator of a batch key (seed, index)."""
    state = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def _source_latents(args, ex: Exports, plan: Plan, device) -> torch.Tensor | None:
    """Standardised latents of the source cells (value A), one per trajectory row, or None."""
    if args.interp_source is None:
        return None
    if plan.interp is None or ex.denoiser is None:
        raise ConditionError("--interp-source needs --interpolate and a denoiser")
    attr, a, _ = plan.interp
    src = ad.read_h5ad(args.interp_source)
    if attr not in src.obs:
        raise ConditionError(f"--interp-source lacks obs column {attr!r}")
    src = src[src.obs[attr].astype(str).to_numpy() == a]
    if src.n_obs == 0:
        raise ConditionError(f"--interp-source has no cells with {attr}={a!r}")
    z = encode_cells(ex.vae, src, ex.genes, device)
    stats = ex.denoiser.latent_stats
    z = (z - stats["mean"]) / stats["std"]
    index = np.arange(plan.num_cells) % src.n_obs  # cycle through the source cells
    return z[torch.from_numpy(index).to(device)]


def generate_parts(args, ex: Exports, plan: Plan, guidance, flow, rank, world, device, sink):
    """Generate this rank's batches, handing each Part to `sink`; return velocity evaluations."""
    batches = plan.batches(args.batch_size)
    start = _source_latents(args, ex, plan, device)
    mine = list(range(rank, len(batches), world))
    keys = batch_generators(plan, batches)
    nfe = 0
    bar = tqdm(
        total=sum(len(batches[k]) for k in mine),
        unit="cell",
        disable=rank != 0,
        desc="generate",
        dynamic_ncols=True,
    )
    for k in mine:
        rows = batches[k]
        gen = generator_of(keys[k])
        s = None if start is None else start[torch.from_numpy(rows).to(device)]
        z, n = sample_latents(ex, plan, rows, guidance, flow, gen, device, s)
        counts, means = decode(ex, z, plan.library_size[rows], gen, not args.no_means)
        sink(Part(rows, counts, means, z.flatten(1).cpu().numpy().astype(np.float32)))
        nfe += n
        bar.update(len(rows))
    bar.close()
    return nfe


H5AD_MEANS_LIMIT_GB = 8.0  # dense means above this go to SOMA (or are left out)


def check_h5ad_size(fmt: str, cells: int, genes: int, means: bool) -> None:
    """Refuse an .h5ad whose dense means layer would not fit comfortably in memory."""
    gigabytes = cells * genes * 4 / 1e9
    if fmt == "h5ad" and means and gigabytes > H5AD_MEANS_LIMIT_GB:
        raise ConditionError(
            f"the means layer of {cells} cells x {genes} genes is {gigabytes:.0f} GB dense, held "
            "in memory for an .h5ad; write a SOMA Experiment (--format soma, streamed batch by "
            "batch) or pass --no-means"
        )


def _settings(args, ex: Exports, plan: Plan, guidance, flow, nfe: int, seconds: float) -> dict:
    return {
        "vae": str(ex.vae_folder),
        "denoiser": str(ex.denoiser.folder) if ex.denoiser else None,
        "classifiers": {a: str(c.folder) for a, c in ex.classifiers.items()},
        "weights": "ema" if ex.denoiser else None,
        "guidance": asdict(guidance),
        "flow": asdict(flow) if ex.denoiser else None,
        "seeds": list(args.seeds),
        "library_size": plan.library_source,
        "n_cells": plan.num_cells,
        "velocity_evaluations_rank0": nfe,
        "seconds": seconds,
        "generated_is_normalized": ex.vae.decoder_head.theta is None,
    }


def _dist():
    """Return (rank, world, barrier) from the launcher's variables (no process group for 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, lambda: None
    from atlasldm.train.distributed import barrier, init_distributed, rank, world_size

    init_distributed()
    return rank(), world_size(), barrier


def run(argv: list[str] | None = None) -> Path:
    """Generate as the command line says; return the output path (written on rank 0)."""
    args = parse_args(argv)
    fmt = args.format or ("h5ad" if args.out.suffix == ".h5ad" else "soma")
    if args.batch_size < 1:
        raise ConditionError(f"--batch-size must be >= 1, got {args.batch_size}")
    rank, world, barrier = _dist()
    device = _device(args.device)
    ex = load_exports(args.vae, args.denoiser, args.classifier).to(device)
    plan = build_plan(args, ex)
    guidance = check_guidance(ex, plan, guidance_config(args))
    sampler = args.sampler or ("euler" if ex.classifiers else "dopri5")
    t_start = args.t_start if args.interp_source else 0.0
    flow = FlowConfig(
        sampler=sampler, num_steps=args.steps, atol=args.atol, rtol=args.rtol, t_start=t_start
    )
    latent_width = ex.vae.config.num_latent_tokens * ex.vae.config.latent_dim
    check_h5ad_size(fmt, plan.num_cells, len(ex.genes), not args.no_means)
    if fmt == "soma" and rank == 0:
        create_soma(args.out, plan, ex.genes, latent_width, not args.no_means)
    barrier()
    t0 = time.perf_counter()
    parts: list[Part] = []
    # SOMA: every batch is written as soon as it exists (bounded memory); h5ad: kept until the end.
    sink = (lambda part: write_soma_part(args.out, plan, part)) if fmt == "soma" else parts.append
    nfe = generate_parts(args, ex, plan, guidance, flow, rank, world, device, sink)
    settings = _settings(args, ex, plan, guidance, flow, nfe, time.perf_counter() - t0)
    if fmt == "soma":
        barrier()
        if rank == 0:
            finish_soma(args.out, settings)
    else:
        _write_h5ad(args.out, parts, plan, ex, settings, rank, world, barrier)
    barrier()
    if rank == 0:
        print(
            f"wrote {plan.num_cells} cells to {args.out} in {settings['seconds']:.1f} s", flush=True
        )
    return args.out


def _write_h5ad(out: Path, parts, plan, ex, settings, rank: int, world: int, barrier) -> None:
    """One process: assemble and write; several: each writes its share, rank 0 merges them."""
    if world == 1:
        write_h5ad_atomic(assemble(parts, plan, ex.genes, settings), out)
        return
    share = out.with_name(f".{out.name}.rank{rank}of{world}.h5ad")
    if parts:
        assemble(parts, plan, ex.genes, settings).write_h5ad(share)
    barrier()
    if rank == 0:
        shares = [out.with_name(f".{out.name}.rank{r}of{world}.h5ad") for r in range(world)]
        pieces = [ad.read_h5ad(s) for s in shares if s.exists()]
        merged = ad.concat(pieces, merge="same", uns_merge="first")
        order = np.argsort([int(n[3:]) for n in merged.obs_names])
        merged = merged[order].copy()
        for attr in plan.values:
            merged.obs[attr] = merged.obs[attr].astype("category")
        write_h5ad_atomic(merged, out)
        for s in shares:
            s.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad requests and exports exit with a one-line message."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        run(argv)
    except (ConditionError, ExportError) as exc:
        sys.exit(f"error: {exc}")

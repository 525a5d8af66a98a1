"""Command line of generation: exports in, an .h5ad or SOMA Experiment of generated cells out.

Examples are in EXAMPLES below (and in `--help`).

The Python API (`generation.api`, `atlasldm.load_pretrained`) runs the same code: this module
turns the command line into a `GenerationRequest` and writes what the API generates.

Launched with several processes (`torchrun --nproc_per_node N launchers/generate.py ...`), each
rank generates every N-th batch; the output is identical to a single process's.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np

from atlasldm.cli_parser import Parser
from atlasldm.generation.api import (
    CellGenerator,
    GenerationRequest,
    Job,
    read_h5ad,
)
from atlasldm.generation.models import load_exports
from atlasldm.generation.sampling import GuidanceConfig
from atlasldm.generation.vocabulary import ConditionError
from atlasldm.generation.writers import (
    Part,
    assemble,
    create_soma,
    finish_soma,
    write_h5ad_atomic,
    write_soma_part,
)
from atlasldm.models.flow import SAMPLERS
from atlasldm.models.pretrained import ExportError

log = logging.getLogger(__name__)
EXAMPLES = """examples:
  # 200 cells of each of two cell types, joint CFG with weight 2 (the VAE export is the one
  # the denoiser export records; --vae names another)
  atlasldm generate --denoiser runs/dit/export --condition "cell_type=CD14+ Monocyte" \\
      --condition "cell_type=CD19+ B" --n-cells 200 --cfg-weight cell_type=2 --out gen.h5ad
  # match a held-out set (same cells per condition, its library sizes), three seeds
  atlasldm generate --denoiser runs/dit/export --match test.h5ad --seeds 0 1 2 --out g.h5ad
  # trajectory between two cell types in 5 steps, classifier-guided
  atlasldm generate --denoiser runs/skip_mlp/export --classifier runs/classifier/export \\
      --interpolate "cell_type=CD14+ Monocyte:CD19+ B" --interp-steps 5 --n-cells 50 \\
      --out t.h5ad
  # several processes: each makes every N-th batch, the output equals one process's
  torchrun --nproc_per_node 2 launchers/generate.py --denoiser runs/dit/export ... --out g.h5ad
"""
DEFAULTS = GenerationRequest()  # the command's defaults are the API's
GUIDANCE = GuidanceConfig()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the parsed command line."""
    return build_parser().parse_args(argv)


def build_parser() -> Parser:
    """Return the parser of the generate command (every option's help shows its default)."""
    p = Parser(
        prog="atlasldm generate",
        description="Generate cells from exported scLDM models (an .h5ad file or a SOMA "
        "Experiment).",
        epilog=EXAMPLES,
    )
    for add_group in (_model_args, _request_args, _sampler_args, _output_args):
        add_group(p)
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    """Add the 'models' options."""
    m = p.add_argument_group("models")
    m.add_argument(
        "--vae",
        type=Path,
        default=None,
        help="VAE export folder; None: the one the --denoiser export records",
    )
    m.add_argument(
        "--denoiser",
        type=Path,
        default=None,
        help="DiT / skip-MLP export folder; None: cells from the VAE prior",
    )
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
    w.add_argument(
        "--n-cells", type=int, default=DEFAULTS.n_cells, help="cells per combination (per α)"
    )
    w.add_argument(
        "--match", type=Path, help=".h5ad reference: its cells' conditions and library sizes"
    )
    w.add_argument(
        "--match-keys", nargs="*", help="obs columns to match; None: the conditioned ones"
    )
    w.add_argument(
        "--library-size",
        default=DEFAULTS.library_size,
        help="'auto' (reference with --match, else statistics), 'stats', 'reference', "
        "an obs column name of the reference, or a number",
    )
    w.add_argument("--interpolate", metavar="ATTR=A:B", help="trajectory between two values")
    w.add_argument(
        "--interp-steps", type=int, default=DEFAULTS.interp_steps, help="α values from 0 to 1"
    )
    w.add_argument(
        "--interp-method",
        choices=["auto", "cfg", "classifier"],
        default=GUIDANCE.interp_method,
        help="guidance of a trajectory; auto: classifier when one is given for the attribute",
    )
    w.add_argument(
        "--interp-source",
        type=Path,
        help=".h5ad of real cells; those with value A start the trajectory",
    )
    w.add_argument(
        "--t-start", type=float, default=DEFAULTS.t_start, help="noise level of --interp-source"
    )


def _sampler_args(p: argparse.ArgumentParser) -> None:
    """Add the 'guidance and sampler' options."""
    g = p.add_argument_group("guidance and sampler")
    g.add_argument(
        "--cfg-mode",
        choices=["auto", "joint", "additive"],
        default="auto",
        help="classifier-free guidance over several attributes; auto: joint where the "
        "denoiser's dropout scheme allows it",
    )
    g.add_argument(
        "--cfg-weight",
        action="append",
        default=[],
        metavar="ATTR=W",
        help="classifier-free guidance weight of an attribute (repeatable; unset: 1.0)",
    )
    g.add_argument(
        "--classifier-scale",
        action="append",
        default=[],
        metavar="ATTR=S",
        help="classifier guidance scale of an attribute (repeatable; unset: 2.0)",
    )
    g.add_argument(
        "--t-min", type=float, default=GUIDANCE.t_min, help="classifier guidance only for t >= this"
    )
    g.add_argument(
        "--max-factor",
        type=float,
        default=GUIDANCE.max_factor,
        help="clip of the (1 - t)/t factor of classifier guidance",
    )
    g.add_argument(
        "--sampler",
        choices=["auto", *SAMPLERS],
        default="auto",
        help="ODE solver; auto: dopri5, or euler with classifier guidance",
    )
    g.add_argument("--steps", type=int, default=DEFAULTS.steps, help="steps of euler / heun")
    g.add_argument("--atol", type=float, default=DEFAULTS.atol, help="absolute tolerance of dopri5")
    g.add_argument("--rtol", type=float, default=DEFAULTS.rtol, help="relative tolerance of dopri5")


def _output_args(p: argparse.ArgumentParser) -> None:
    """Add the 'output' options."""
    o = p.add_argument_group("output")
    o.add_argument(
        "--out", required=True, type=Path, help="output: an .h5ad file, or a SOMA folder"
    )
    o.add_argument(
        "--format",
        choices=["auto", "h5ad", "soma"],
        default="auto",
        help="output format; auto: h5ad for an --out ending in .h5ad, else soma",
    )
    o.add_argument("--no-means", action="store_true", help="leave out the decoded-means layer")
    o.add_argument("--seeds", nargs="+", type=int, default=DEFAULTS.seeds, help="generation seeds")
    o.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULTS.batch_size,
        help="cells per batch (keys each batch's random stream)",
    )
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
        "" if args.cfg_mode == "auto" else args.cfg_mode,
        _pairs(args.cfg_weight, "--cfg-weight"),
        _pairs(args.classifier_scale, "--classifier-scale"),
        args.t_min,
        args.max_factor,
        args.interp_method,
    )


def request_of(args: argparse.Namespace) -> GenerationRequest:
    """Return the GenerationRequest of the command line (reference files read)."""
    return GenerationRequest(
        conditions=list(args.condition),
        n_cells=args.n_cells,
        seeds=list(args.seeds),
        match=None if args.match is None else read_h5ad(args.match, "match"),
        match_keys=args.match_keys,
        library_size=args.library_size,
        interpolate=args.interpolate,
        interp_steps=args.interp_steps,
        interp_source=None
        if args.interp_source is None
        else read_h5ad(args.interp_source, "interp_source"),
        t_start=args.t_start,
        guidance=guidance_config(args),
        sampler=None if args.sampler == "auto" else args.sampler,
        steps=args.steps,
        atol=args.atol,
        rtol=args.rtol,
        batch_size=args.batch_size,
        means=not args.no_means,
    )


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


def check_out(out: Path, fmt: str) -> None:
    """Refuse an --out the chosen format cannot be written to, before any work."""
    if fmt == "h5ad" and out.is_dir():
        raise ConditionError(
            f"--out {out} is a folder; pass a file name ending in .h5ad, or --format soma"
        )
    if fmt == "soma" and out.is_file():
        raise ConditionError(
            f"--out {out} is a file and a SOMA output is a folder; pass another path, or "
            "--format h5ad"
        )
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConditionError(f"--out {out}: cannot write under {existing}; pass another path")


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
    fmt = args.format
    if fmt == "auto":
        fmt = "h5ad" if args.out.suffix == ".h5ad" else "soma"
    if args.batch_size < 1:
        raise ConditionError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_out(args.out, fmt)
    rank, world, barrier = _dist()
    exports = load_exports(args.vae, args.denoiser, args.classifier)
    generator = CellGenerator(exports, args.device)
    job = generator.prepare(request_of(args))
    check_h5ad_size(fmt, job.plan.num_cells, len(exports.genes), job.request.means)
    if fmt == "h5ad" and world == 1:
        t0 = time.perf_counter()
        write_h5ad_atomic(generator.run(job), args.out)
        seconds = time.perf_counter() - t0
    elif fmt == "soma":
        seconds = _write_soma(args.out, generator, job, (rank, world, barrier))
    else:
        seconds = _write_h5ad_ranks(args.out, generator, job, (rank, world, barrier))
    barrier()
    if rank == 0:
        print(f"wrote {job.plan.num_cells} cells to {args.out} in {seconds:.1f} s", flush=True)
    return args.out


def _write_soma(out: Path, generator: CellGenerator, job: Job, dist) -> float:
    """Stream every batch into a SOMA Experiment as soon as it exists (bounded memory)."""
    rank, world, barrier = dist
    ex = generator.exports
    latent_width = ex.vae.config.num_latent_tokens * ex.vae.config.latent_dim
    if rank == 0:
        create_soma(out, job.plan, ex.genes, latent_width, job.request.means)
    barrier()
    t0 = time.perf_counter()
    nfe = generator.generate_parts(
        job, lambda part: write_soma_part(out, job.plan, part), rank, world
    )
    seconds = time.perf_counter() - t0
    barrier()
    if rank == 0:
        finish_soma(out, generator.settings(job, nfe, seconds))
    return seconds


def _write_h5ad_ranks(out: Path, generator: CellGenerator, job: Job, dist) -> float:
    """Several processes: each writes its share, rank 0 merges them into `out`."""
    rank, world, barrier = dist
    parts: list[Part] = []
    t0 = time.perf_counter()
    nfe = generator.generate_parts(job, parts.append, rank, world)
    seconds = time.perf_counter() - t0
    settings = generator.settings(job, nfe, seconds)
    genes, plan = generator.exports.genes, job.plan
    share = out.with_name(f".{out.name}.rank{rank}of{world}.h5ad")
    if parts:
        assemble(parts, plan, genes, settings).write_h5ad(share)
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
    return seconds


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad requests and exports exit with a one-line message (exit code 2)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        run(argv)
    except (ConditionError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

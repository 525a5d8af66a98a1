"""Python API of generation, in the style of scvi-tools and Hugging Face (docs/api.md)::

    import atlasldm

    gen = atlasldm.load_pretrained("runs/dit/export")  # a DiT / skip-MLP export finds its VAE
    adata = gen.generate(conditions={"cell_type": ["CD14+ Monocyte", "CD19+ B"]}, n_cells=200,
                         cfg_weight=2.0, seed=0)        # AnnData, as the generate command writes
    z = gen.encode(real_adata)                          # (cells, M, D) latents, in batches

The generate command (`generation.cli`) runs the same code: `prepare` checks a request and
plans it, `generate_parts` makes its batches; the same seed gives the same counts either way.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import torch

from atlasldm.generation.encode import ENCODE_BATCH, encode_cells
from atlasldm.generation.models import Exports, load_exports
from atlasldm.generation.plan import Plan, plan_request
from atlasldm.generation.sampling import GuidanceConfig, check_guidance, decode, sample_latents
from atlasldm.generation.vocabulary import ConditionError
from atlasldm.generation.writers import Part, assemble
from atlasldm.models.flow import FlowConfig
from atlasldm.models.pretrained import ExportError, model_type
from atlasldm.progress import Progress


@dataclass
class GenerationRequest:
    """What to generate and how: one field per option of the generate command."""

    conditions: list[str] = field(default_factory=list)  # ATTR=VALUE specs (VALUE * = all)
    n_cells: int = 100  # cells per combination of condition values (per α of a trajectory)
    seeds: list[int] = field(default_factory=lambda: [0])  # every cell is made once per seed
    match: ad.AnnData | None = None  # reference: its cells' conditions and library sizes
    match_keys: list[str] | None = None  # obs columns to match (None: the conditioned ones)
    library_size: str | float = "auto"  # auto | stats | reference | obs column | a number
    interpolate: str | None = None  # ATTR=A:B trajectory
    interp_steps: int = 5  # α values from 0 to 1
    interp_source: ad.AnnData | None = None  # real cells; those with value A start the path
    t_start: float = 0.1  # noise level of interp_source
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    sampler: str | None = None  # None or "auto": dopri5, or euler with classifier guidance
    steps: int = 50  # steps of euler / heun
    atol: float = 1e-5  # tolerances of dopri5
    rtol: float = 1e-5
    batch_size: int = 256  # cells per batch (a batch's key seeds its random stream)
    means: bool = True  # keep the decoded NB means as layer "means"
    progress: bool = True  # a bar on a terminal, log lines with rate and ETA otherwise


@dataclass
class Job:
    """A checked request: its plan, resolved guidance and sampler, start latents (or None)."""

    request: GenerationRequest
    plan: Plan
    guidance: GuidanceConfig
    flow: FlowConfig
    start: torch.Tensor | None = None


def device_of(name: str | torch.device) -> torch.device:
    """Return the device `auto` (this rank's GPU when there is one), `cpu` or `cuda[:i]` names."""
    if str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConditionError(
            f"--device {name} is not a device; pass auto, cpu or cuda[:i]"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConditionError(f"--device {name}: no CUDA GPU is visible; pass --device cpu or auto")
    return device


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


class CellGenerator:
    """Exports loaded for generation: `generate` cells, `encode` real ones.

    Build it with `load_pretrained`; `exports` holds the networks, vocabularies and folders.
    """

    def __init__(self, exports: Exports, device: str | torch.device = "auto") -> None:
        self.device = device_of(device)
        self.exports = exports.to(self.device)

    def __repr__(self) -> str:
        ex = self.exports
        den = f"denoiser={ex.denoiser.folder}" if ex.denoiser else "VAE prior"
        return f"CellGenerator(vae={ex.vae_folder}, {den}, conditions={ex.conditioned})"

    @property
    def conditions(self) -> dict[str, list[str]]:
        """The attributes the networks condition on, and their values."""
        return {a: list(self.exports.vocab.values(a)) for a in self.exports.conditioned}

    def generate(
        self,
        conditions: Mapping[str, str | Sequence[str]] | Sequence[str] | None = None,
        n_cells: int = 100,
        cfg_weight: float | Mapping[str, float] | None = None,
        seed: int | Sequence[int] = 0,
        **options: Any,
    ) -> ad.AnnData:
        """Return generated cells as an AnnData, in the generate command's output format.

        Args:
            conditions: `{"cell_type": ["B", "T"]}` (a value `"*"` = every value), or
                `["cell_type=B", ...]`; cells are made for every combination.
            n_cells: cells per combination (per α of a trajectory).
            cfg_weight: classifier-free guidance weight, one for every conditioned attribute
                or per attribute (default 1.0).
            seed: a seed or a list of seeds (every cell once per seed).
            **options: any other field of `GenerationRequest` (`match`, `interpolate`,
                `sampler`, `steps`, `batch_size`, `means`, ...) or `GuidanceConfig`
                (`cfg_mode`, `classifier_scale`, `t_min`, `max_factor`, `interp_method`).

        Raises:
            ConditionError: a request the exports cannot serve (the message says why).
        """
        request = self.request(conditions, n_cells, cfg_weight, seed, **options)
        return self.run(self.prepare(request))

    def request(self, conditions, n_cells, cfg_weight, seed, **options) -> GenerationRequest:
        """Return the GenerationRequest of `generate`'s arguments."""
        guidance_names = {f.name for f in dataclasses.fields(GuidanceConfig)}
        guidance_names -= {"cfg_weights", "classifier_scales"}  # cfg_weight, classifier_scale
        names = {f.name for f in dataclasses.fields(GenerationRequest)}
        names -= {"guidance", "conditions", "n_cells", "seeds"}  # arguments of their own
        unknown = sorted(set(options) - names - guidance_names - {"classifier_scale"})
        if unknown:
            raise TypeError(
                f"generate() got unknown options {unknown}; see GenerationRequest and "
                "GuidanceConfig (seed takes one seed or a list)"
            )
        scales = self._per_attribute(options.pop("classifier_scale", None), "classifier_scale")
        guidance = {k: options.pop(k) for k in list(options) if k in guidance_names}
        if guidance.get("cfg_mode") == "auto":  # the command's spelling of the default
            guidance["cfg_mode"] = ""
        guidance["cfg_weights"] = self._per_attribute(cfg_weight, "cfg_weight")
        guidance["classifier_scales"] = scales
        seeds = [int(seed)] if isinstance(seed, int | np.integer) else [int(s) for s in seed]
        for key in ("match", "interp_source"):
            if isinstance(options.get(key), str | Path):
                options[key] = read_h5ad(Path(options[key]), key)
        return GenerationRequest(
            condition_specs(conditions),
            n_cells,
            seeds,
            guidance=GuidanceConfig(**guidance),
            **options,
        )

    def _per_attribute(self, value, name: str) -> dict[str, float]:
        """A number for every attribute its networks condition on, or a dict as given."""
        if value is None:
            return {}
        if isinstance(value, Mapping):
            return {str(k): float(v) for k, v in value.items()}
        ex = self.exports
        attrs = ex.denoiser.columns if name == "cfg_weight" and ex.denoiser else []
        attrs = list(ex.classifiers) if name == "classifier_scale" else attrs
        if not attrs:
            raise ConditionError(f"{name} given, but no network of these exports takes it")
        return {a: float(value) for a in attrs}

    def prepare(self, request: GenerationRequest) -> Job:
        """Check and plan a request; every error is raised here, before any work."""
        ex, r = self.exports, request
        if r.batch_size < 1:
            raise ConditionError(f"--batch-size must be >= 1, got {r.batch_size}")
        if not r.seeds:
            raise ConditionError("--seeds needs at least one seed")
        plan = plan_request(r, ex.vocab, ex.libsize_stats, ex.conditioned)
        guidance = check_guidance(ex, plan, r.guidance)
        auto = "euler" if ex.classifiers else "dopri5"
        sampler = auto if r.sampler in (None, "auto") else r.sampler
        t_start = r.t_start if r.interp_source is not None else 0.0
        flow = FlowConfig(
            sampler=sampler, num_steps=r.steps, atol=r.atol, rtol=r.rtol, t_start=t_start
        )
        return Job(r, plan, guidance, flow, self._source_latents(r, plan))

    def _source_latents(self, r: GenerationRequest, plan: Plan) -> torch.Tensor | None:
        """Standardised latents of the source cells (value A), one per trajectory row, or None."""
        ex, src = self.exports, r.interp_source
        if src is None:
            return None
        if plan.interp is None or ex.denoiser is None:
            raise ConditionError("--interp-source needs --interpolate and a denoiser")
        attr, a, _ = plan.interp
        if attr not in src.obs:
            raise ConditionError(f"--interp-source lacks obs column {attr!r}")
        src = src[src.obs[attr].astype(str).to_numpy() == a]
        if src.n_obs == 0:
            raise ConditionError(f"--interp-source has no cells with {attr}={a!r}")
        z = encode_cells(ex.vae, src, ex.genes, self.device)
        stats = ex.denoiser.latent_stats
        z = (z - stats["mean"]) / stats["std"]
        index = np.arange(plan.num_cells) % src.n_obs  # cycle through the source cells
        return z[torch.from_numpy(index).to(self.device)]

    def generate_parts(
        self, job: Job, sink: Callable[[Part], None], rank: int = 0, world: int = 1
    ) -> int:
        """Make batches rank, rank + world, ... of the plan, handing each Part to `sink`.

        Returns the velocity evaluations. Batches are keyed by their index in the plan, so
        any world size makes the same cells.
        """
        ex, plan = self.exports, job.plan
        batches = plan.batches(job.request.batch_size)
        mine = list(range(rank, len(batches), world))
        keys = batch_generators(plan, batches)
        show = job.request.progress and rank == 0
        total = sum(len(batches[k]) for k in mine)
        bar = Progress("generate", total=total, unit="cells") if show else None
        nfe = 0
        for k in mine:
            rows = batches[k]
            gen = generator_of(keys[k])
            s = None if job.start is None else job.start[torch.from_numpy(rows).to(self.device)]
            z, n = sample_latents(ex, plan, rows, job.guidance, job.flow, gen, self.device, s)
            counts, means = decode(ex, z, plan.library_size[rows], gen, job.request.means)
            sink(Part(rows, counts, means, z.flatten(1).cpu().numpy().astype(np.float32)))
            nfe += n
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
        return nfe

    def settings(self, job: Job, nfe: int, seconds: float) -> dict:
        """Return the run's settings, recorded in the output (uns["generation"])."""
        ex = self.exports
        return {
            "vae": str(ex.vae_folder),
            "denoiser": str(ex.denoiser.folder) if ex.denoiser else None,
            "classifiers": {a: str(c.folder) for a, c in ex.classifiers.items()},
            "weights": "ema" if ex.denoiser else None,
            "guidance": asdict(job.guidance),
            "flow": asdict(job.flow) if ex.denoiser else None,
            "seeds": list(job.request.seeds),
            "library_size": job.plan.library_source,
            "n_cells": job.plan.num_cells,
            "velocity_evaluations_rank0": nfe,
            "seconds": seconds,
            "generated_is_normalized": ex.vae.decoder_head.theta is None,
        }

    def run(self, job: Job) -> ad.AnnData:
        """Generate every batch of a prepared job in this process; return the AnnData."""
        t0 = time.perf_counter()
        parts: list[Part] = []
        nfe = self.generate_parts(job, parts.append)
        settings = self.settings(job, nfe, time.perf_counter() - t0)
        return assemble(parts, job.plan, self.exports.genes, settings)

    def encode(
        self, adata: ad.AnnData, batch_size: int = ENCODE_BATCH, layer: str | None = None
    ) -> np.ndarray:
        """Return the VAE's posterior-mean latents (N, M, D) float32 of the cells of `adata`.

        Raw counts come from X (or `layer`); var names are gene ids or symbols of the export's
        vocabulary. Cells are encoded `batch_size` at a time: memory is bounded by one batch.
        """
        ex = self.exports
        with Progress("encode", total=adata.n_obs, unit="cells") as bar:
            z = encode_cells(ex.vae, adata, ex.genes, self.device, batch_size, layer, bar)
        return z.cpu().numpy().astype(np.float32)


def condition_specs(conditions) -> list[str]:
    """Return ATTR=VALUE specs of `{attr: value or values}`, of specs, or of None."""
    if conditions is None:
        return []
    if isinstance(conditions, str):
        return [conditions]
    if isinstance(conditions, Mapping):
        specs = []
        for attr, values in conditions.items():
            values = [values] if isinstance(values, str) else list(values)
            specs += [f"{attr}={v}" for v in values]
        return specs
    return [str(c) for c in conditions]


def read_h5ad(path: Path, what: str) -> ad.AnnData:
    """Read the .h5ad of option `what`; a missing file is a ConditionError naming it."""
    flag = f"--{what.replace('_', '-')}"
    if not path.is_file():
        raise ConditionError(f"{flag} {path} does not exist; pass an .h5ad")
    try:
        return ad.read_h5ad(path)
    except OSError as exc:  # h5py: not an HDF5 file, truncated, unreadable
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConditionError(f"{flag} {path} cannot be read as .h5ad ({first})") from exc


def load_pretrained(
    folder: str | Path,
    vae: str | Path | None = None,
    classifiers: Sequence[str | Path] = (),
    device: str | torch.device = "auto",
) -> CellGenerator:
    """Return a CellGenerator of an export folder.

    Args:
        folder: a DiT or skip-MLP export (its VAE export is found from the path and digest it
            records), or a VAE export alone (cells from the VAE prior).
        vae: the VAE export, when not the one the denoiser records.
        classifiers: noisy-latent classifier exports for classifier guidance.
        device: "auto" (a GPU when there is one), "cpu" or "cuda[:i]".

    Raises:
        ExportError: not an export, exports that do not belong together, or a classifier
            export passed as `folder`.
    """
    kind = model_type(folder)
    if kind == "classifier":
        raise ExportError(
            f"{folder} is a classifier export; pass it as classifiers=[...] beside the "
            "denoiser export it guides"
        )
    if kind == "vae":
        exports = load_exports(folder, None, classifiers)
    else:
        exports = load_exports(vae, folder, classifiers)
    return CellGenerator(exports, device)


__all__ = ["CellGenerator", "GenerationRequest", "load_pretrained"]

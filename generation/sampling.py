"""One batch of generation: noise -> guided ODE -> latents -> chunked NB decode.

Pipeline: docs/model.md, 'Generation'.

Shape legend: B cells of the batch, M latent tokens, D latent width, G genes, A attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from atlasldm.generation.models import Exports
from atlasldm.generation.plan import Plan
from atlasldm.generation.vocabulary import ConditionError
from atlasldm.models.flow import FlowConfig, sample, velocity_from_model
from atlasldm.models.guidance import (
    VALID_GUIDANCE,
    ClassifierTerm,
    cfg_interpolation_velocity,
    cfg_velocity,
    classifier_guided_velocity,
    interpolation_terms,
    noised_start,
)
from atlasldm.models.likelihoods import sample_nb


@dataclass
class GuidanceConfig:
    """Guidance of one run.

    See docs/model.md, 'Classifier-free guidance', 'Classifier guidance' and 'Interpolation'.
    """

    cfg_mode: str = ""  # joint | additive; "" = joint where the dropout scheme allows it
    cfg_weights: dict[str, float] = field(default_factory=dict)  # per attribute, default 1.0
    classifier_scales: dict[str, float] = field(default_factory=dict)  # default 2.0
    t_min: float = 0.05  # classifier guidance only for t >= t_min
    max_factor: float = 20.0  # clip of the (1 - t)/t factor
    interp_method: str = "auto"  # cfg | classifier | auto (classifier when one exists)


def check_guidance(ex: Exports, plan: Plan, g: GuidanceConfig) -> GuidanceConfig:
    """Return the guidance with defaults resolved; raises ConditionError on a bad request."""
    given = [a for a, v in plan.values.items() if np.any(v != "")]
    den = ex.denoiser
    for attr in g.cfg_weights:
        if den is None or attr not in den.columns:
            has = den.columns if den else []
            raise ConditionError(
                f"--cfg-weight on {attr!r}, but the denoiser conditions on {has}; drop the weight"
            )
    for attr in g.classifier_scales:
        if attr not in ex.classifiers:
            raise ConditionError(
                f"--classifier-scale on {attr!r}, but no classifier export for it was given "
                f"(have {sorted(ex.classifiers)})"
            )
    unknown = [a for a in given if a not in ex.conditioned]
    if unknown and (ex.denoiser is not None or ex.classifiers):
        raise ConditionError(
            f"conditions {unknown} are on no network of these exports (the denoiser conditions "
            f"on {den.columns if den else []}, classifiers on {sorted(ex.classifiers)})"
        )
    mode = g.cfg_mode
    if den is not None and den.columns:
        mode = mode or VALID_GUIDANCE[den.scheme][0]
    interp = g.interp_method
    if plan.interp is not None:
        attr = plan.interp[0]
        if interp == "auto":
            interp = "classifier" if attr in ex.classifiers else "cfg"
        if interp == "classifier" and attr not in ex.classifiers:
            raise ConditionError(f"--interp-method classifier needs a classifier for {attr!r}")
        if interp == "cfg" and (den is None or attr not in den.columns):
            raise ConditionError(
                f"--interp-method cfg needs a denoiser conditioned on {attr!r}; pass a classifier "
                "for it, or a denoiser trained with that condition"
            )
    return GuidanceConfig(
        mode, dict(g.cfg_weights), dict(g.classifier_scales), g.t_min, g.max_factor, interp
    )


def _codes(ex: Exports, plan: Plan, rows: np.ndarray, attrs, override=None) -> torch.Tensor:
    """Return codes (B, A) of `attrs` for plan rows; `override` fixes some attributes' values."""
    cols = []
    for a in attrs:
        if override and a in override:
            values = [override[a]] * len(rows)
        elif a in plan.values:
            values = plan.values[a][rows]
        else:
            values = [""] * len(rows)  # not requested: the null code
        cols.append(ex.vocab.codes(a, values))
    if not cols:
        return torch.zeros(len(rows), 0, dtype=torch.long)
    return torch.from_numpy(np.stack(cols, axis=1))  # (B, A)


def _base_velocity(ex: Exports, plan: Plan, rows: np.ndarray, g: GuidanceConfig, device):
    den = ex.denoiser
    if plan.interp is not None and g.interp_method == "cfg":
        attr, a, b = plan.interp
        alpha = float(plan.interp_alpha[rows[0]])
        l1 = _codes(ex, plan, rows, den.columns, {attr: a}).to(device)
        l2 = _codes(ex, plan, rows, den.columns, {attr: b}).to(device)
        return cfg_interpolation_velocity(den.net, l1, l2, alpha)
    if not den.columns:
        return velocity_from_model(den.net, None)
    labels = _codes(ex, plan, rows, den.columns).to(device)  # (B, A)
    given = {a for a in den.columns if a in plan.values and np.any(plan.values[a][rows] != "")}
    weights = [g.cfg_weights.get(a, 1.0) if a in given else None for a in den.columns]
    vocab_sizes = [len(ex.vocab.values(a)) for a in den.columns]
    return cfg_velocity(den.net, labels, weights, vocab_sizes, g.cfg_mode, den.scheme)


def _classifier_terms(ex: Exports, plan: Plan, rows: np.ndarray, g: GuidanceConfig, device):
    terms = []
    for attr, clf in ex.classifiers.items():
        scale = g.classifier_scales.get(attr, 2.0)
        if plan.interp is not None and plan.interp[0] == attr:
            if g.interp_method != "classifier":
                continue
            _, a, b = plan.interp
            y1 = torch.full((len(rows),), ex.vocab.values(attr).index(a), device=device)
            y2 = torch.full((len(rows),), ex.vocab.values(attr).index(b), device=device)
            alpha = float(plan.interp_alpha[rows[0]])
            terms += interpolation_terms(clf.net, y1, y2, alpha, scale)
            continue
        values = plan.values.get(attr)
        if values is None or np.any(values[rows] == ""):
            continue  # attribute not requested for these cells: no guidance towards it
        codes = torch.from_numpy(ex.vocab.codes(attr, values[rows])).to(device)
        terms.append(ClassifierTerm(clf.net, codes, scale))
    return terms


def sample_latents(
    ex: Exports,
    plan: Plan,
    rows: np.ndarray,
    g: GuidanceConfig,
    flow: FlowConfig,
    gen: torch.Generator,
    device: torch.device,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Return (latents z (B, M, D) in VAE space, velocity evaluations) for plan rows `rows`.

    Without a denoiser z ~ N(0, I), the VAE prior (the paper's "w/o LDM" ablation). `start`
    holds standardised source latents (B, M, D) for trajectories begun from real cells.
    """
    m, d = ex.vae.config.num_latent_tokens, ex.vae.config.latent_dim
    noise = torch.randn(len(rows), m, d, generator=gen).to(device)  # CPU draw: device-free
    if ex.denoiser is None:
        return noise, 0
    stats = ex.denoiser.latent_stats
    velocity = _base_velocity(ex, plan, rows, g, device)
    terms = _classifier_terms(ex, plan, rows, g, device)
    if terms:
        velocity = classifier_guided_velocity(velocity, terms, g.t_min, g.max_factor)
    x0 = noise
    if start is not None:
        x0 = noised_start(start.to(device), flow.t_start, gen)
    result = sample(velocity, x0, flow)
    return result.x * stats["std"] + stats["mean"], result.nfe


@torch.no_grad()
def decode(
    ex: Exports, z: torch.Tensor, library_size: np.ndarray, gen: torch.Generator, means: bool
) -> tuple[sp.csr_matrix, np.ndarray | None]:
    """Return (counts CSR (B, G) float32 holding integers, decoded means (B, G) or None).

    NB: μ = softmax(logits)·ℓ, counts ~ NB(μ, θ). A Gaussian-likelihood VAE returns its
    log1p-CP10k prediction plus unit noise instead (the output is then flagged normalised).
    """
    vae = ex.vae
    logits = vae.decode_logits(z)  # (B, G) fp32, decoded in gene chunks
    ell = torch.as_tensor(library_size, dtype=torch.float32, device=z.device)  # (B,)
    head = vae.decoder_head
    if head.theta is None:
        x = logits.cpu() + torch.randn(logits.shape, generator=gen)
        mu = logits
    else:
        log_mu = head.log_mu(logits, torch.logsumexp(logits, dim=-1), ell)  # (B, G)
        genes = torch.arange(1, vae.config.num_genes + 1, device=z.device)
        # Sampled on the CPU: the generator is a CPU one, so counts do not depend on the device.
        x = sample_nb(log_mu.cpu(), head.log_theta(genes).cpu(), gen)
        mu = log_mu.exp()
    counts = sp.csr_matrix(x.cpu().numpy().astype(np.float32))
    return counts, (mu.cpu().numpy().astype(np.float32) if means else None)

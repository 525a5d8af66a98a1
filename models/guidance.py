"""Guidance for the flow sampler: multi-condition CFG, classifier guidance, interpolation.

Every function here returns a velocity callable `(x, t) -> v` that the samplers of
`models/flow.py` integrate. Write v(S) for the velocity with the attributes in S given and the
others null (docs/model.md, 'Classifier-free guidance'). REF is the reference implementation
(docs/model.md, 'Tags').

Shape legend (docs/model.md, 'Notation'):
    B  cells
    M  latent tokens
    D  latent width per token
    A  condition attributes; labels (B, A) int64, code vocab_a is the null token
    K  evaluations stacked along the cell axis in one forward pass
    C  classes of a noisy-latent classifier
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from atlasldm.models.embeddings import CFG_DROPOUT_SCHEMES, CfgDropoutScheme, null_labels
from atlasldm.models.flow import ModelFn, VelocityFn

GuidanceMode = Literal["joint", "additive"]
# Which guidance modes a dropout scheme trains for (docs/model.md, 'Classifier-free guidance'):
# joint dropout never shows the model a single attribute alone, per-batch-attribute dropout
# never shows two together.
VALID_GUIDANCE: dict[str, tuple[str, ...]] = {
    "joint": ("joint",),
    "per_batch_attribute": ("additive",),
    "independent": ("joint", "additive"),
}
ClassifierFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_guidance_mode(mode: str, scheme: CfgDropoutScheme) -> None:
    """Raise ValueError if CFG `mode` is not valid for a model trained with dropout `scheme`."""
    if scheme not in CFG_DROPOUT_SCHEMES:
        raise ValueError(f"unknown cfg_dropout_scheme {scheme!r}; use one of {CFG_DROPOUT_SCHEMES}")
    if mode not in VALID_GUIDANCE[scheme]:
        raise ValueError(
            f"guidance mode {mode!r} is invalid for a model trained with cfg_dropout_scheme "
            f"{scheme!r}: it never saw the conditions that mode evaluates; valid modes: "
            f"{VALID_GUIDANCE[scheme]}"
        )


def _stacked_velocity(model: ModelFn, stacked_labels: torch.Tensor, k: int) -> VelocityFn:
    """Return (x, t) -> velocities (K, B, M, D) from ONE forward pass on K stacked copies."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xs = x.repeat(k, *([1] * (x.dim() - 1)))  # (K·B, M, D), block j = copy j
        v = model(xs, t.repeat(k), stacked_labels)  # (K·B, M, D)
        return v.reshape(k, *x.shape)  # (K, B, M, D)

    return velocity


def _keep_only(labels: torch.Tensor, null: torch.Tensor, keep: Sequence[int]) -> torch.Tensor:
    out = null.clone()
    out[:, list(keep)] = labels[:, list(keep)]
    return out


def cfg_velocity(
    model: ModelFn,
    labels: torch.Tensor,
    weights: Sequence[float | None],
    vocab_sizes: Sequence[int],
    mode: GuidanceMode,
    scheme: CfgDropoutScheme,
) -> VelocityFn:
    """Return the classifier-free-guided velocity for labels (B, A) and per-attribute weights.

    `joint`: ṽ = v(∅) + w̄·(v(G) − v(∅)), G the given attributes, w̄ the mean of their weights.
    `additive`: ṽ = v(∅) + Σ_{a∈G} w_a·(v({a}) − v(∅)). A weight of None leaves that attribute
    unconditioned (null in every evaluation). All evaluations of a step form one forward pass.

    Args:
        model: backbone model(x, t, labels) -> v.
        labels: (B, A) target codes.
        weights: A guidance weights (REF default 1.0 each), None to leave an attribute out.
        vocab_sizes: per-attribute class counts (null code = vocab size).
        mode: `joint` or `additive`.
        scheme: dropout scheme the model was trained with (from the export); a mode the model
            was not trained for raises ValueError.
    """
    if len(weights) != len(vocab_sizes):
        raise ValueError(f"need one weight per attribute ({len(vocab_sizes)}), got {len(weights)}")
    if mode not in ("joint", "additive"):
        raise ValueError(f"unknown guidance mode {mode!r}; use 'joint' or 'additive'")
    check_guidance_mode(mode, scheme)
    given = [a for a, w in enumerate(weights) if w is not None]
    null = null_labels(vocab_sizes, labels.shape[0], device=labels.device)  # (B, A)
    if mode == "joint" or not given:
        conds = [_keep_only(labels, null, given)] if given else []
        coefs = [sum(weights[a] for a in given) / len(given)] if given else []
    else:
        conds = [_keep_only(labels, null, [a]) for a in given]
        coefs = [float(weights[a]) for a in given]
    stacked = torch.cat([null, *conds], dim=0)  # (K·B, A), block 0 unconditional
    inner = _stacked_velocity(model, stacked, 1 + len(conds))

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        vs = inner(x, t)  # (K, B, M, D)
        out = vs[0]
        for j, w in enumerate(coefs, start=1):
            out = out + w * (vs[j] - vs[0])
        return out

    return velocity


def cfg_interpolation_velocity(
    model: ModelFn, labels1: torch.Tensor, labels2: torch.Tensor, alpha: float
) -> VelocityFn:
    """Return (1 − α)·v(y1) + α·v(y2), one stacked forward pass (OURS, not scDiffusion's method).

    labels1, labels2: (B, A) full label sets of the two endpoint conditions (nulls allowed).
    """
    inner = _stacked_velocity(model, torch.cat([labels1, labels2], dim=0), 2)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        vs = inner(x, t)  # (2, B, M, D)
        return (1.0 - alpha) * vs[0] + alpha * vs[1]

    return velocity


@dataclass
class ClassifierTerm:
    """One s·∇_x log p(y | x, t) term of classifier guidance."""

    classifier: ClassifierFn  # (x (B, M, D), t (B,)) -> logits (B, C)
    labels: torch.Tensor  # (B,) target class per cell
    scale: float  # guidance scale s (scDiffusion default 2)


def classifier_grad(
    x: torch.Tensor, t: torch.Tensor, terms: Sequence[ClassifierTerm]
) -> torch.Tensor:
    """Return Σ_k s_k ∇_x log p_k(y_k | x, t) as (B, M, D), computed in fp32 with autograd.

    Works inside the samplers' no_grad context: gradients are enabled locally on a detached copy.
    """
    with torch.enable_grad():
        xg = x.detach().float().requires_grad_(True)
        total = xg.new_zeros(())
        for term in terms:
            logp = torch.log_softmax(term.classifier(xg, t).float(), dim=-1)  # (B, C)
            picked = logp.gather(1, term.labels.reshape(-1, 1).to(x.device))  # (B, 1)
            # Cells are independent, so the gradient of the batch sum is the per-cell gradient.
            total = total + term.scale * picked.sum()
        (grad,) = torch.autograd.grad(total, xg)
    return grad.to(x.dtype)


def guidance_factor(t: torch.Tensor, t_min: float = 0.05, max_factor: float = 20.0) -> torch.Tensor:
    """Return (1 − t)/t clipped at max_factor for t ≥ t_min and 0 below, shape (B,)."""
    factor = ((1.0 - t) / t.clamp_min(1e-12)).clamp(max=max_factor)
    return torch.where(t >= t_min, factor, torch.zeros_like(factor))


def classifier_guided_velocity(
    velocity: VelocityFn,
    terms: Sequence[ClassifierTerm],
    t_min: float = 0.05,
    max_factor: float = 20.0,
) -> VelocityFn:
    """Return ṽ(x, t) = v(x, t) + ((1 − t)/t)·Σ_k s_k ∇_x log p_k(y_k | x, t).

    Adding s·∇ log p to the score of the linear path changes the velocity by s(1 − t)/t times
    that gradient (docs/model.md, 'Classifier guidance'). The factor diverges at t → 0, hence
    t_min and max_factor.
    `velocity` may itself be a CFG velocity (guidance is then applied to ṽ). Use with the
    fixed-grid samplers: the switch at t_min is a discontinuity an adaptive solver dislikes.
    """

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = velocity(x, t)
        factor = guidance_factor(t, t_min, max_factor)  # (B,)
        if not bool((factor > 0).any()):
            return v
        grad = classifier_grad(x, t, terms)  # (B, M, D)
        return v + factor.reshape(-1, *([1] * (x.dim() - 1))).to(v.dtype) * grad.to(v.dtype)

    return guided


def interpolation_terms(
    classifier: ClassifierFn,
    labels1: torch.Tensor,
    labels2: torch.Tensor,
    alpha: float,
    scale: float = 2.0,
) -> list[ClassifierTerm]:
    """Return the scDiffusion gradient-interpolation terms s(1 − α)∇log p(y1) + sα∇log p(y2)."""
    return [
        ClassifierTerm(classifier, labels1, scale * (1.0 - alpha)),
        ClassifierTerm(classifier, labels2, scale * alpha),
    ]


def noised_start(
    z: torch.Tensor, t_start: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Return source latents moved back to t_start on the path: t·z + (1 − t)·ε, shape of z.

    ε is drawn on the generator's device (CPU when None) so it does not depend on the device.
    Integrate from t_start to 1 afterwards (FlowConfig.t_start or the samplers' t0).
    """
    device = generator.device if generator is not None else torch.device("cpu")
    eps = torch.randn(z.shape, generator=generator, device=device, dtype=torch.float32)
    return t_start * z + (1.0 - t_start) * eps.to(device=z.device, dtype=z.dtype)

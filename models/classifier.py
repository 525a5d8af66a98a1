"""Noisy-latent classifier for classifier guidance (scDiffusion `HALF_MLP`).

One classifier per attribute, trained on x_t = t·z + (1 − t)·ε with t ~ U[0, 1] (the flow
path, t = 1 is data) and cross-entropy on the label (docs/model.md, 'Noisy-latent classifiers').

Shape legend (docs/model.md, 'Notation'):
    B  cells
    M  latent tokens
    D  latent width per token
    N  flattened latent width M·D
    H  hidden widths; H0 is also the time-embedding width
    C  classes of the attribute
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from atlasldm.models.embeddings import TimestepEmbedder
from atlasldm.models.export_format import Pretrained
from atlasldm.models.flow import draw_time_and_noise, interpolate
from atlasldm.models.skip_mlp import TimeConditionedLayer


@dataclass
class ClassifierConfig:
    """Hyperparameters of a noisy-latent classifier (scDiffusion widths by default)."""

    num_latent_tokens: int = 16  # M: latent tokens, from the VAE export
    latent_dim: int = 16  # D: latent width per token, from the VAE export
    num_classes: int = 2  # C: classes of the attribute; code C (null) is ignored in the loss
    hidden_dims: list[int] = field(default_factory=lambda: [1000, 500, 200])  # layer widths
    time_freq_dim: int = 2000  # sinusoidal channels (scDiffusion: its first width, 2000)
    time_scale: float = 1000.0  # t in [0, 1] scaled like scDiffusion's integer DDPM steps
    norm_eps: float = 1e-5  # LayerNorm epsilon (torch default, as scDiffusion)

    # Old field names, still accepted in YAML and export config.json (models.config_names).
    DEPRECATED_NAMES: ClassVar[dict[str, str]] = {"latent_tokens": "num_latent_tokens"}

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError("hidden_dims must be non-empty and positive")


class NoisyLatentClassifier(Pretrained, nn.Module):
    """Time-conditioned MLP: logits p(y | x_t, t) from a noisy latent (B, M, D)."""

    model_type: ClassVar[str] = "classifier"  # config.json model_type (models.export_format)
    config_class: ClassVar[type] = ClassifierConfig

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        dims = list(config.hidden_dims)
        n_in = config.num_latent_tokens * config.latent_dim
        self.t_embedder = TimestepEmbedder(dims[0], config.time_freq_dim, config.time_scale)
        self.layers = nn.ModuleList(
            TimeConditionedLayer(a, b, dims[0], config.norm_eps)
            for a, b in zip([n_in, *dims[:-1]], dims, strict=True)
        )
        self.out = nn.Linear(dims[-1], config.num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return logits (B, C) for noisy latents x (B, M, D) at times t (B,)."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.t_embedder(t)  # (B, H0)
        h = x.reshape(x.shape[0], -1)  # (B, N)
        for layer in self.layers:
            h = layer(h, emb)  # (B, H_i)
        return self.out(h)  # (B, C)


def classifier_loss(
    classifier: NoisyLatentClassifier,
    z: torch.Tensor,
    labels: torch.Tensor,
    t_generator: torch.Generator | None = None,
    noise_generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return (cross-entropy in fp32, {"accuracy": tensor}) on x_t = t·z + (1 − t)·ε.

    Args:
        classifier: the noisy-latent classifier.
        z: clean latents (B, M, D).
        labels: (B,) class codes of the attribute; the null code (== num_classes, unknown
            label) is ignored; a batch with no labelled cell gives a zero loss.
        t_generator: generator for t; noise_generator: generator for ε (defaults to t's).
    """
    z = z.float()
    t, eps = draw_time_and_noise(z, t_generator, noise_generator)
    x_t, _ = interpolate(z, eps, t)
    logits = classifier(x_t, t).float()  # (B, C)
    null = classifier.config.num_classes
    known = (labels != null).float()  # (B,)
    # Masked mean instead of ignore_index: no host sync, and an all-null batch gives 0, not NaN.
    per_cell = F.cross_entropy(logits, labels.clamp(max=null - 1), reduction="none")  # (B,)
    count = known.sum().clamp_min(1.0)
    loss = (per_cell * known).sum() / count
    correct = (logits.argmax(-1) == labels).float() * known
    return loss, {"accuracy": (correct.sum() / count).detach()}

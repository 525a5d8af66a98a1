"""The exports a generation run uses, loaded and checked against each other.

A denoiser or classifier records the digest of the VAE export it was trained on; generation
refuses a pair whose digests (or, for exports without one, genes and latent shapes) differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from atlasldm.generation.vocabulary import ConditionError, Vocabulary
from atlasldm.models.pretrained import (
    ExportError,
    export_digest,
    load_classifier,
    load_denoiser,
    load_vae,
)
from atlasldm.models.vae import VAE


@dataclass
class Denoiser:
    """A loaded denoiser export with what sampling needs."""

    net: torch.nn.Module  # DiT or SkipMLP, eval mode (EMA weights)
    columns: list[str]  # conditioned attributes, in label-column order
    scheme: str  # condition-dropout scheme it was trained with
    latent_stats: dict  # scalar mean/std of latent standardisation
    folder: Path


@dataclass
class Classifier:
    """A loaded noisy-latent classifier export for one attribute."""

    net: torch.nn.Module
    attribute: str
    latent_stats: dict
    folder: Path


@dataclass
class Exports:
    """VAE (+ optional denoiser and classifiers), their vocabularies and library-size stats."""

    vae: VAE
    vae_folder: Path
    genes: pd.DataFrame  # genes.tsv: token, feature_id, feature_name (token 1..V in order)
    vocab: Vocabulary
    libsize_stats: dict | None  # libsize.json "log_library_size" (None in direct mode)
    denoiser: Denoiser | None = None
    classifiers: dict[str, Classifier] = field(default_factory=dict)

    @property
    def conditioned(self) -> list[str]:
        """Attributes any network conditions on (denoiser columns, then classifier attributes)."""
        cols = list(self.denoiser.columns) if self.denoiser else []
        return cols + [a for a in self.classifiers if a not in cols]

    def to(self, device: torch.device) -> Exports:
        """Move every network to `device`; returns self."""
        self.vae.to(device)
        if self.denoiser:
            self.denoiser.net.to(device)
        for c in self.classifiers.values():
            c.net.to(device)
        return self


def _json(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise ExportError(f"{path} is missing: {folder} is not an export of this kind")
    return json.loads(path.read_text())


def _check_same_vae(folder: Path, vae_folder: Path, digest: str, shape: tuple[int, int], m, d):
    provenance = _json(folder, "provenance.json")
    recorded = provenance.get("vae_export_digest")
    if recorded is not None and recorded != digest:
        raise ExportError(
            f"{folder} was trained on another VAE export (digest {recorded}, "
            f"{provenance.get('vae_export')}) than {vae_folder} (digest {digest}); pass the VAE "
            "export it was trained on"
        )
    if (m, d) != shape:
        raise ExportError(
            f"{folder} works on latents {m}x{d} but the VAE {vae_folder} makes {shape[0]}x"
            f"{shape[1]}; pass the VAE export it was trained on"
        )


def _check_vocabulary(folder: Path, attr: str, values: list[str], vocab: Vocabulary) -> None:
    if attr not in vocab.labels or vocab.labels[attr] != list(values):
        raise ExportError(
            f"{folder}: the values of condition {attr!r} differ from the VAE export's "
            "labels.json; the exports come from different training copies"
        )


def load_exports(
    vae_dir: str | Path, denoiser_dir: str | Path | None = None, classifier_dirs=()
) -> Exports:
    """Load and cross-check the exports; raises ExportError on any mismatch."""
    vae_folder = Path(vae_dir)
    vae = load_vae(vae_folder)
    digest = export_digest(vae_folder)
    shape = (vae.config.num_latent_tokens, vae.config.latent_dim)
    genes = pd.read_csv(vae_folder / "genes.tsv", sep="\t", dtype=str, keep_default_na=False)
    vocab = Vocabulary(_json(vae_folder, "labels.json"))
    libsize = _json(vae_folder, "libsize.json").get("log_library_size")
    out = Exports(vae, vae_folder, genes, vocab, libsize)
    if denoiser_dir is not None:
        folder = Path(denoiser_dir)
        net = load_denoiser(folder)
        _check_same_vae(
            folder, vae_folder, digest, shape, net.config.num_latent_tokens, net.config.latent_dim
        )
        if (folder / "genes.tsv").read_text() != (vae_folder / "genes.tsv").read_text():
            raise ExportError(f"{folder} has another gene vocabulary than {vae_folder}")
        cond = _json(folder, "conditions.json")
        for attr in cond["columns"]:
            _check_vocabulary(folder, attr, cond["vocabularies"][attr], vocab)
        stats = _json(folder, "latent_stats.json")
        out.denoiser = Denoiser(
            net, list(cond["columns"]), cond["dropout"]["scheme"], stats, folder
        )
    for cdir in classifier_dirs:
        folder = Path(cdir)
        net = load_classifier(folder)
        _check_same_vae(
            folder, vae_folder, digest, shape, net.config.num_latent_tokens, net.config.latent_dim
        )
        cond = _json(folder, "conditions.json")
        _check_vocabulary(folder, cond["attribute"], cond["values"], vocab)
        stats = _json(folder, "latent_stats.json")
        if out.denoiser is not None and not _close(stats, out.denoiser.latent_stats):
            raise ExportError(
                f"{folder} standardises latents with mean/std {stats['mean']:.4g}/"
                f"{stats['std']:.4g}, the denoiser with {out.denoiser.latent_stats['mean']:.4g}/"
                f"{out.denoiser.latent_stats['std']:.4g}; its gradients would point the wrong "
                "way: train both on the same VAE export and data"
            )
        if cond["attribute"] in out.classifiers:
            raise ConditionError(f"two classifiers for attribute {cond['attribute']!r}")
        out.classifiers[cond["attribute"]] = Classifier(net, cond["attribute"], stats, folder)
    return out


def _close(a: dict, b: dict, rtol: float = 1e-3) -> bool:
    scale = max(abs(b["std"]), 1e-12)
    return abs(a["mean"] - b["mean"]) <= rtol * scale and abs(a["std"] - b["std"]) <= rtol * scale

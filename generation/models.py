"""The exports a generation run uses, loaded and checked against each other.

A denoiser or classifier records the VAE export it was trained on (a path relative to its own
folder, and a digest); without an explicit VAE that one is loaded, and generation refuses a
pair whose digests (or, for exports without one, genes and latent shapes) differ. Exports passed
in the wrong place (a DiT as the VAE, the two swapped) are named before anything is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from atlasldm.generation.vocabulary import ConditionError, Vocabulary
from atlasldm.models.pretrained import (
    DENOISERS,
    ExportError,
    export_digest,
    load_classifier,
    load_denoiser,
    load_vae,
    model_type,
    referenced_vae,
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


FLAG_OF = {"vae": "--vae", "dit": "--denoiser", "skip_mlp": "--denoiser"}
FLAG_OF["classifier"] = "--classifier"


def _side_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise ExportError(
            f"{path} is missing: {folder} is a model export without the side files generation "
            "needs; export it with the training stage's export launcher"
        )
    return path


def _json(folder: Path, name: str) -> dict:
    return json.loads(_side_file(folder, name).read_text())


def check_kinds(vae_dir: Path | None, denoiser_dir: Path | None, classifier_dirs=()) -> None:
    """Refuse exports given in the wrong place (their config.json names their model type)."""
    vae_kind = model_type(vae_dir) if vae_dir is not None else "vae"
    den_kind = model_type(denoiser_dir) if denoiser_dir is not None else "dit"
    if vae_kind in DENOISERS and den_kind == "vae":
        raise ExportError(
            f"--vae and --denoiser are swapped: {vae_dir} is a {vae_kind} export and "
            f"{denoiser_dir} a VAE export; pass --vae {denoiser_dir} --denoiser {vae_dir}"
        )
    if vae_kind != "vae":
        raise ExportError(
            f"--vae {vae_dir} is a {vae_kind} export, not a VAE export; pass it as "
            f"{FLAG_OF[vae_kind]} (and --vae the VAE export it was trained on)"
        )
    if den_kind not in DENOISERS:
        raise ExportError(
            f"--denoiser {denoiser_dir} is a {den_kind} export, not a denoiser (dit or "
            f"skip_mlp) export; pass it as {FLAG_OF[den_kind]}"
        )
    for folder in classifier_dirs:
        kind = model_type(folder)
        if kind != "classifier":
            raise ExportError(
                f"--classifier {folder} is a {kind} export, not a classifier export; pass it "
                f"as {FLAG_OF[kind]}"
            )


def _check_same_vae(folder: Path, vae_folder: Path, digest: str, shape: tuple[int, int], m, d):
    provenance = _json(folder, "provenance.json")
    recorded = provenance.get("vae_export_digest")
    if recorded is not None and recorded != digest:
        named = provenance.get("vae_export")
        where = f", {Path(os.path.normpath(folder / named))}" if named else ""
        raise ExportError(
            f"{folder} was trained on another VAE export (digest {recorded}{where}) than "
            f"{vae_folder} (digest {digest}); pass the VAE export it was trained on"
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
    vae_dir: str | Path | None, denoiser_dir: str | Path | None = None, classifier_dirs=()
) -> Exports:
    """Load and cross-check the exports; raises ExportError on any mismatch.

    `vae_dir` None: the VAE export the denoiser names (its digest checked).
    """
    denoiser_dir = Path(denoiser_dir) if denoiser_dir is not None else None
    classifier_dirs = [Path(c) for c in classifier_dirs]
    if vae_dir is None and denoiser_dir is None:
        raise ExportError("no model export given: pass --vae, --denoiser or both")
    check_kinds(Path(vae_dir) if vae_dir else None, denoiser_dir, classifier_dirs)
    vae_folder = Path(vae_dir) if vae_dir is not None else referenced_vae(denoiser_dir)
    vae = load_vae(vae_folder)
    genes_tsv = _side_file(vae_folder, "genes.tsv")
    genes = pd.read_csv(genes_tsv, sep="\t", dtype=str, keep_default_na=False)
    vocab = Vocabulary(_json(vae_folder, "labels.json"))
    libsize = _json(vae_folder, "libsize.json").get("log_library_size")
    out = Exports(vae, vae_folder, genes, vocab, libsize)
    if denoiser_dir is not None:
        out.denoiser = _denoiser(denoiser_dir, out)
    for folder in classifier_dirs:
        clf = _classifier(folder, out)
        if clf.attribute in out.classifiers:
            raise ConditionError(f"two classifiers for attribute {clf.attribute!r}")
        out.classifiers[clf.attribute] = clf
    return out


def _same_vae(folder: Path, net: torch.nn.Module, ex: Exports) -> None:
    vae = ex.vae.config
    shape = (vae.num_latent_tokens, vae.latent_dim)
    m, d = net.config.num_latent_tokens, net.config.latent_dim
    _check_same_vae(folder, ex.vae_folder, export_digest(ex.vae_folder), shape, m, d)


def _denoiser(folder: Path, ex: Exports) -> Denoiser:
    net = load_denoiser(folder)
    _same_vae(folder, net, ex)
    if _side_file(folder, "genes.tsv").read_text() != (ex.vae_folder / "genes.tsv").read_text():
        raise ExportError(f"{folder} has another gene vocabulary than {ex.vae_folder}")
    cond = _json(folder, "conditions.json")
    for attr in cond["columns"]:
        _check_vocabulary(folder, attr, cond["vocabularies"][attr], ex.vocab)
    stats = _json(folder, "latent_stats.json")
    return Denoiser(net, list(cond["columns"]), cond["dropout"]["scheme"], stats, folder)


def _classifier(folder: Path, ex: Exports) -> Classifier:
    net = load_classifier(folder)
    _same_vae(folder, net, ex)
    cond = _json(folder, "conditions.json")
    _check_vocabulary(folder, cond["attribute"], cond["values"], ex.vocab)
    stats = _json(folder, "latent_stats.json")
    if ex.denoiser is not None and not _close(stats, ex.denoiser.latent_stats):
        raise ExportError(
            f"{folder} standardises latents with mean/std {stats['mean']:.4g}/"
            f"{stats['std']:.4g}, the denoiser with {ex.denoiser.latent_stats['mean']:.4g}/"
            f"{ex.denoiser.latent_stats['std']:.4g}; its gradients would point the wrong "
            "way: train both on the same VAE export and data"
        )
    return Classifier(net, cond["attribute"], stats, folder)


def _close(a: dict, b: dict, rtol: float = 1e-3) -> bool:
    scale = max(abs(b["std"]), 1e-12)
    return abs(a["mean"] - b["mean"]) <= rtol * scale and abs(a["std"] - b["std"]) <= rtol * scale

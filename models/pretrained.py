"""Load exported models with torch, safetensors and json only (no DeepSpeed, no run configs).

The folder format (weights, config.json with `model_type`, side files, the `export.json`
manifest written last) is `models.export_format`; every model class reads and writes it with
`from_pretrained` / `save_pretrained`. This module adds the per-kind loaders, the model type of
a folder, and the VAE export a denoiser or classifier export was trained on: its
`provenance.json` names it by a path relative to the export folder (format 2; format 1 wrote the
path as given) and by content digest (`export_digest`). See docs/api.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from atlasldm.models.classifier import NoisyLatentClassifier
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.export_format import (  # noqa: F401  (re-exported: the format's names)
    CARD,
    CONFIG,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_TYPES,
    WEIGHTS,
    ExportError,
    Pretrained,
    check_export_folder,
    export_digest,
    infer_model_type,
    read_config,
    read_export,
)
from atlasldm.models.skip_mlp import SkipMLP, SkipMLPConfig
from atlasldm.models.vae import VAE

DENOISERS = {"dit": (DiT, DiTConfig), "skip_mlp": (SkipMLP, SkipMLPConfig)}
MODEL_CLASSES: dict[str, type[Pretrained]] = {
    "vae": VAE,
    "dit": DiT,
    "skip_mlp": SkipMLP,
    "classifier": NoisyLatentClassifier,
}


def model_type(folder: str | Path) -> str:
    """Return the model type of an export folder: vae, dit, skip_mlp or classifier.

    Raises:
        ExportError: not a complete export, or a config.json no model class reads.
    """
    folder = Path(folder)
    kind = infer_model_type(read_config(folder))
    if kind not in MODEL_CLASSES:
        raise ExportError(
            f"{folder / CONFIG} names no model type this code loads ({kind}); expected one of "
            f"{list(MODEL_TYPES)}"
        )
    return kind


def load_model(folder: str | Path) -> Pretrained:
    """Return the model of any export folder (its class from the model type), in eval mode."""
    return MODEL_CLASSES[model_type(folder)].from_pretrained(folder)


def load_vae(folder: str | Path) -> VAE:
    """Return the exported VAE in eval mode (fp32, CPU)."""
    return VAE.from_pretrained(folder)


def load_denoiser(folder: str | Path) -> DiT | SkipMLP:
    """Return the exported denoiser (DiT or skip MLP; EMA weights) in eval mode."""
    config = read_config(folder)
    kind = infer_model_type(config) or "dit"  # format 1 without a "denoiser" key: a DiT
    if kind not in DENOISERS:
        if kind in MODEL_CLASSES:
            raise ExportError(
                f"{folder} is a {kind} export, not a denoiser (dit or skip_mlp) export"
            )
        raise ExportError(
            f"{Path(folder) / CONFIG}: unknown denoiser {kind!r}; expected dit or skip_mlp"
        )
    return DENOISERS[kind][0].from_pretrained(folder)


def load_classifier(folder: str | Path) -> NoisyLatentClassifier:
    """Return an exported noisy-latent classifier in eval mode (fp32, CPU)."""
    return NoisyLatentClassifier.from_pretrained(folder)


def vae_reference(folder: str | Path) -> tuple[str | None, str | None]:
    """Return (path as recorded, digest) of the VAE export a latent-stage export was trained on."""
    path = Path(folder) / "provenance.json"
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is corrupt ({exc}); write the export again") from exc
    return record.get("vae_export"), record.get("vae_export_digest")


def referenced_vae(folder: str | Path) -> Path:
    """Return the VAE export a denoiser or classifier export names, its digest checked.

    The recorded path is resolved against the export folder (so a run tree moved or copied as a
    whole keeps working); a format-1 path relative to the working directory is tried next.

    Raises:
        ExportError: no VAE recorded, none found there, or one with another digest.
    """
    folder = Path(folder)
    recorded, digest = vae_reference(folder)
    if not recorded:
        raise ExportError(f"{folder} does not record its VAE export; pass the VAE export too")
    candidates = [Path(os.path.normpath(folder / recorded)), Path(recorded)]
    found = next((c for c in candidates if (c / MANIFEST).is_file()), None)
    if found is None:
        raise ExportError(
            f"{folder} was trained on the VAE export {candidates[0]}, which does not exist; "
            "pass the VAE export it was trained on"
        )
    if digest is not None and export_digest(found) != digest:
        raise ExportError(
            f"{folder} was trained on VAE export digest {digest}, but {found} (the VAE it "
            f"names) has digest {export_digest(found)}: that VAE was re-exported or replaced; "
            "pass the VAE export it was trained on"
        )
    return found

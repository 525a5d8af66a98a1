"""The frozen VAE of the latent stages (denoiser and classifier): which export, loading it, and
the provenance it adds to their exports. The latents it yields are `train/latents.py`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from atlasldm.data.config import DataConfig
from atlasldm.models.pretrained import export_digest, load_vae
from atlasldm.models.vae import VAE
from atlasldm.train.export import ExportError


@dataclass
class FrozenVAEConfig:
    """Which VAE export feeds a latent stage (denoiser or classifier), and how latents are made."""

    vae_run: str = "vae"  # VAE run folder under run.root whose export/ is loaded
    vae_export: str = ""  # explicit VAE export folder ("" = <run.root>/<vae_run>/export)
    latent_stats_cells: int = 256  # training cells used to estimate the latent mean/std
    latents: Literal["encode", "cache"] = "encode"  # encode each batch, or a cache written once


@dataclass
class FrozenVAE:
    """A VAE export loaded for encoding: the frozen model on this rank's device, and its folder."""

    model: VAE  # eval mode, requires_grad False
    folder: Path  # the export folder it was loaded from
    provenance: dict[str, Any]  # the export's provenance.json (its data source, ...)

    @property
    def device(self) -> torch.device:
        """The device the model (and so the batches it encodes) is on."""
        return next(self.model.parameters()).device

    def provenance_fields(self, data: DataConfig) -> dict[str, str]:
        """Return the provenance fields of a latent stage: the VAE export, its digest, the data."""
        return {
            "vae_export": str(self.folder),
            "vae_export_digest": export_digest(self.folder),
            "data_source": data.source,
        }


def vae_export_dir(stage: FrozenVAEConfig, root: str) -> Path:
    """Return the VAE export folder a latent stage loads (`root` is `run.root`)."""
    if stage.vae_export:
        return Path(stage.vae_export)
    return Path(root) / stage.vae_run / "export"


def load_frozen_vae(folder: Path, device: torch.device) -> FrozenVAE:
    """Return the VAE of an export on `device`, frozen and in eval mode.

    Raises:
        ExportError: the export is missing or unreadable.
    """
    if not (folder / "export.json").is_file():
        raise ExportError(
            f"VAE export {folder} not found (no export.json): run train_vae.py first, or point "
            "stage.vae_export / stage.vae_run at an existing VAE run"
        )
    vae = load_vae(folder)  # old field names in config.json are upgraded there
    vae.requires_grad_(False)
    provenance = json.loads((folder / "provenance.json").read_text())
    return FrozenVAE(vae.eval().to(device), folder, provenance)

"""Load exported models with torch, safetensors and json only (no DeepSpeed, no run configs).

An export folder (written by `train/export.py`) holds `model.safetensors` (fp32 weights; EMA for
the denoiser), `config.json` (the model dataclass as a dict; denoisers add `"denoiser"`), side
files such as `genes.tsv`, and `export.json`, the manifest listing every file with its size,
written last: a folder without it, or with a file of the wrong size, is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from atlasldm.models.classifier import ClassifierConfig, NoisyLatentClassifier
from atlasldm.models.config_names import upgrade_config_dict
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.skip_mlp import SkipMLP, SkipMLPConfig
from atlasldm.models.vae import VAE, VAEConfig

FORMAT_VERSION = 1
MANIFEST = "export.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DENOISERS = {"dit": (DiT, DiTConfig), "skip_mlp": (SkipMLP, SkipMLPConfig)}


class ExportError(RuntimeError):
    """An export folder cannot be written or read; the message names the folder and the fix."""


def read_export(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """Return (fp32 state dict, model config dict, folder) of an export.

    Side files are read by the caller from the returned folder.

    Raises:
        ExportError: the folder is missing, incomplete (no manifest) or corrupt.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"export folder {folder} does not exist; run the export launcher first")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ExportError(
            f"{folder} has no {MANIFEST}: the export was interrupted or is not an export; "
            "write it again with the export launcher"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ExportError(f"{manifest_path} is corrupt ({exc}); write the export again") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{folder} has export format {manifest.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}; re-export with this code version"
        )
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            raise ExportError(
                f"{path} is missing or has the wrong size (manifest says {size} bytes); "
                "the export is corrupt, write it again"
            )
    try:
        state = load_file(str(folder / WEIGHTS))
        config = json.loads((folder / CONFIG).read_text())
    except Exception as exc:  # safetensors raises its own error types
        raise ExportError(f"{folder} cannot be read ({exc}); write the export again") from exc
    return state, config, folder


def export_digest(folder: str | Path) -> str:
    """Return a 16-hex digest of an export's weights and config (its identity, not its path).

    Two exports of the same architecture have manifests of identical sizes, so the content
    is hashed: a latent cache or a denoiser records the digest of the VAE it was built on.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        with open(folder / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _config(cls: type, values: dict[str, Any], folder: Path) -> Any:
    """Build dataclass `cls` from exported values; unknown keys mean another code version.

    Exports written before a field was renamed keep loading: old names are renamed, with a
    deprecation warning (models.config_names).
    """
    try:
        values = upgrade_config_dict(cls, values, where=str(folder / CONFIG))
    except ValueError as exc:
        raise ExportError(f"{exc}; the export is corrupt, write it again") from exc
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ExportError(
            f"{folder / CONFIG} has keys {unknown} that {cls.__name__} does not know; the export "
            "was written by another code version"
        )
    return cls(**values)


def _load(model: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path) -> torch.nn.Module:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"{folder / WEIGHTS} does not match its config: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; the export is corrupt or from another code version"
        )
    return model.eval()


def load_vae(folder: str | Path) -> VAE:
    """Return the exported VAE in eval mode (fp32, CPU)."""
    state, config, folder = read_export(folder)
    return _load(VAE(_config(VAEConfig, config, folder)), state, folder)


def load_denoiser(folder: str | Path) -> DiT | SkipMLP:
    """Return the exported denoiser (DiT or skip MLP; EMA weights) in eval mode."""
    state, config, folder = read_export(folder)
    config = dict(config)
    kind = config.pop("denoiser", "dit")
    if kind not in DENOISERS:
        raise ExportError(f"{folder / CONFIG}: unknown denoiser {kind!r}; expected dit or skip_mlp")
    model_cls, config_cls = DENOISERS[kind]
    return _load(model_cls(_config(config_cls, config, folder)), state, folder)


def load_classifier(folder: str | Path) -> NoisyLatentClassifier:
    """Return an exported noisy-latent classifier in eval mode (fp32, CPU)."""
    state, config, folder = read_export(folder)
    return _load(NoisyLatentClassifier(_config(ClassifierConfig, config, folder)), state, folder)

"""The export folder format: write it atomically, read it back, and the model classes' mixin.

An export folder holds `model.safetensors` (fp32 weights), `config.json` (the model dataclass
as a dict, plus `"model_type"` and `"format_version"`), side files (`genes.tsv`, ...) and
`export.json`, the manifest listing every file with its size, written LAST: a folder without
it, or with a file of the wrong size, is refused. Format and model card: docs/api.md.

This module imports no model class, so the classes can inherit `Pretrained` (their
`save_pretrained` / `from_pretrained`); `models.pretrained` adds the per-kind loaders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from atlasldm.models.config_names import upgrade_config_dict

FORMAT_VERSION = 2  # 2: config.json names model_type and format_version; README.md card
READABLE_VERSIONS = (1, 2)  # version 1 exports (no model_type) keep loading
MANIFEST = "export.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
META_KEYS = ("model_type", "format_version")  # config.json keys that are not model fields
# model_type -> the class that loads it (names only: this module imports no model class)
CLASS_OF = {
    "vae": "VAE",
    "dit": "DiT",
    "skip_mlp": "SkipMLP",
    "classifier": "NoisyLatentClassifier",
}
MODEL_TYPES = tuple(CLASS_OF)
FILE_MODE, FOLDER_MODE = 0o644, 0o755  # exports are shared: world-readable whatever the umask


class ExportError(RuntimeError):
    """An export folder cannot be written or read; the message names the folder and the fix."""


def infer_model_type(config: dict[str, Any]) -> str | None:
    """Return the model type of a config.json dict; exports of format 1 have no `model_type`.

    Those are told apart as the training stages wrote them: denoisers carry `"denoiser"`, a VAE
    config has `num_genes`, a classifier config `num_classes`. None: not a model export.
    """
    declared = config.get("model_type") or config.get("denoiser")
    if declared:
        return str(declared)
    if "num_genes" in config:
        return "vae"
    if "num_classes" in config:
        return "classifier"
    return None


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_export_folder(
    folder: str | Path,
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    extra_files: dict[str, bytes | str] | None = None,
) -> Path:
    """Write an export folder atomically and return its path; an existing export is replaced.

    `config` is written as config.json as given (callers add `model_type`). The folder is
    assembled under a temporary name and renamed into place, so a crash never leaves a
    half-written folder under the final name; files are 0644 and the folder 0755.
    """
    folder = Path(folder)
    extra_files = dict(extra_files or {})
    reserved = {MANIFEST, WEIGHTS, CONFIG} & set(extra_files)
    if reserved or any("/" in name or name.startswith(".") for name in extra_files):
        raise ExportError(f"extra file names must be plain and not {sorted(reserved)}")
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS))
        _fsync_file(tmp / WEIGHTS)
        _fsync_write(tmp / CONFIG, json.dumps(config, indent=2, sort_keys=True).encode())
        for name, content in extra_files.items():
            _fsync_write(tmp / name, content.encode() if isinstance(content, str) else content)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        manifest = {"format_version": FORMAT_VERSION, "files": files}
        # The manifest goes last: its presence is what makes the folder an export.
        _fsync_write(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        for path in tmp.iterdir():  # safetensors writes 0600; a shared export must be readable
            path.chmod(FILE_MODE)
        tmp.chmod(FOLDER_MODE)
        _swap_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _swap_into_place(tmp: Path, folder: Path) -> None:
    # os.replace cannot overwrite a non-empty directory: move the old export aside first. A crash
    # between the two renames leaves no export under `folder` (and the old one under `.old`),
    # never a mixture of the two.
    old = folder.with_name(f".{folder.name}.old{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    dir_fd = os.open(folder.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    shutil.rmtree(old, ignore_errors=True)


def check_export_folder(folder: str | Path) -> dict[str, Any]:
    """Return the manifest of a complete export; raises ExportError naming what is wrong."""
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
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ExportError(
            f"{folder} has export format {manifest.get('format_version')}, this code reads "
            f"{list(READABLE_VERSIONS)}; load it with the code version that wrote it"
        )
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            raise ExportError(
                f"{path} is missing or has the wrong size (manifest says {size} bytes); "
                "the export is corrupt, write it again"
            )
    return manifest


def read_config(folder: str | Path) -> dict[str, Any]:
    """Return config.json of a complete export as written (model fields and META_KEYS)."""
    folder = Path(folder)
    check_export_folder(folder)
    try:
        return json.loads((folder / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(
            f"{folder / CONFIG} cannot be read ({exc}); write the export again"
        ) from exc


def read_export(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """Return (fp32 state dict, model config dict without META_KEYS, folder) of an export.

    Side files are read by the caller from the returned folder.

    Raises:
        ExportError: the folder is missing, incomplete (no manifest) or corrupt.
    """
    state, config, folder = read_export_raw(folder)
    return state, {k: v for k, v in config.items() if k not in META_KEYS}, folder


def read_export_raw(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """Like `read_export`, with config.json as written (META_KEYS included)."""
    folder = Path(folder)
    config = read_config(folder)
    try:
        state = load_file(str(folder / WEIGHTS))
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


def build_config(cls: type, values: dict[str, Any], folder: Path) -> Any:
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


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path):
    """Load `state` into `model` strictly and return it in eval mode."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"{folder / WEIGHTS} does not match its config: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; the export is corrupt or from another code version"
        )
    return model.eval()


def check_model_type(folder: Path, config: dict[str, Any], expected: str) -> None:
    """Refuse an export of another model type, naming what it is and what loads it."""
    found = infer_model_type(config)
    if found is not None and found != expected:
        raise ExportError(
            f"{folder} is a {found} export, not a {expected} export; load it with "
            f"{CLASS_OF.get(found, found)}.from_pretrained, or atlasldm.load_pretrained"
        )


def export_config(model_type: str, config: Any) -> dict[str, Any]:
    """Return config.json of a model: its dataclass fields, model_type and format_version.

    Denoisers also keep `"denoiser"`, the key format-1 exports and the DiT stage use.
    """
    out = {"model_type": model_type, "format_version": FORMAT_VERSION}
    if model_type in ("dit", "skip_mlp"):
        out["denoiser"] = model_type
    return {**out, **dataclasses.asdict(config)}


class Pretrained:
    """`save_pretrained` / `from_pretrained` for a model class with a dataclass `config`.

    A subclass sets `model_type` (one of MODEL_TYPES) and `config_class`; its `__init__` takes
    the config alone.
    """

    model_type: ClassVar[str]
    config_class: ClassVar[type]

    def save_pretrained(
        self, folder: str | Path, extra_files: dict[str, bytes | str] | None = None
    ) -> Path:
        """Write this model as an export folder (fp32 weights); returns the folder."""
        state = {
            k: v.detach().float() if v.is_floating_point() else v.detach()
            for k, v in self.state_dict().items()  # type: ignore[attr-defined]
        }
        config = export_config(self.model_type, self.config)  # type: ignore[attr-defined]
        return write_export_folder(folder, state, config, extra_files)

    @classmethod
    def from_pretrained(cls, folder: str | Path):
        """Return the model of an export folder in eval mode (fp32, CPU)."""
        state, config, folder = read_export_raw(folder)
        check_model_type(folder, config, cls.model_type)
        fields = {k: v for k, v in config.items() if k not in (*META_KEYS, "denoiser")}
        model = cls(build_config(cls.config_class, fields, folder))  # type: ignore[call-arg]
        return load_weights(model, state, folder)

"""Export folders: plain fp32 weights + config + side files, loadable without DeepSpeed.

Layout (conventions.md §7): `model.safetensors`, `config.json` (the model dataclass as a dict),
any extra files (`genes.tsv`, `conditions.json`, ...) and `export.json`, the manifest, written
LAST. The folder is assembled under a temporary name and renamed into place, so a crash never
leaves a half-written folder under the final name; a folder without a manifest is not an export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MANIFEST = "export.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class ExportError(RuntimeError):
    """An export folder cannot be written or read; the message names the folder and the fix."""


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_export(
    folder: str | Path,
    state_dict_fp32: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    extra_files: dict[str, bytes | str] | None = None,
) -> Path:
    """Write an export folder atomically and return its path; an existing export is replaced.

    Args:
        folder: destination folder, e.g. `runs/<name>/export`.
        state_dict_fp32: full weights (consolidated, fp32); tensors are made contiguous on CPU.
        model_config: JSON-serialisable model config (the model dataclass as a dict).
        extra_files: file name -> content (str or bytes), e.g. `genes.tsv`, `conditions.json`.
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
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict_fp32.items()}
        save_file(tensors, str(tmp / WEIGHTS))
        _fsync_file(tmp / WEIGHTS)
        _fsync_write(tmp / CONFIG, json.dumps(model_config, indent=2, sort_keys=True).encode())
        for name, content in extra_files.items():
            _fsync_write(tmp / name, content.encode() if isinstance(content, str) else content)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        manifest = {"format_version": FORMAT_VERSION, "files": files}
        # The manifest goes last: its presence is what makes the folder an export.
        _fsync_write(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
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

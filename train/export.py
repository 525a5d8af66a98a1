"""Export folders: plain fp32 weights + config + side files, loadable without DeepSpeed.

Layout (docs/design.md): `model.safetensors`, `config.json` (the model dataclass as a dict),
any extra files (`genes.tsv`, `conditions.json`, ...) and `export.json`, the manifest, written
LAST. The folder is assembled under a temporary name and renamed into place, so a crash never
leaves a half-written folder under the final name; a folder without a manifest is not an export.
Every stage's export also carries a `provenance.json` (`provenance_json`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# The reading side and the format constants live in models/, so that downstream packages load
# exports with models alone; this module adds the atomic writer.
from atlasldm.models.pretrained import (  # noqa: F401  (re-exported)
    CONFIG,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    ExportError,
    read_export,
)


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


def code_version() -> str:
    """Return the git commit of the code (with '+dirty'), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def provenance_json(stage: str, info: dict[str, Any], **fields: Any) -> str:
    """Return the text of an export's provenance.json.

    Holds the stage name, the loop's export `info` (step, cells seen, validation metrics), the
    stage's own `fields` (data source, fingerprints, ...), the code version and the UTC time.
    """
    record = {
        "stage": stage,
        **info,
        **fields,
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return json.dumps(record, indent=2, default=str)

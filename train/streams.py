"""The cells a stage trains on: the data source (the built-in copy when none is given) and this
rank's training and validation streams. Shared by every stage's `build_stage`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from atlasldm.data.config import DataConfig
from atlasldm.data.ingest import main as ingest_main
from atlasldm.data.stream import CellStream
from atlasldm.train.distributed import barrier, is_main, rank, world_size

BUILTIN = "builtin:pbmc68k"


def resolve_source(data: DataConfig, root: str) -> str:
    """Return the data source, ingesting the built-in copy on rank 0 first when none is given."""
    if data.source:
        return data.source
    copy = Path(root) / "data" / "pbmc68k"
    if is_main() and not (copy / "manifest.json").is_file():
        print(f"ingesting {BUILTIN} into {copy} (first use)", flush=True)
        if ingest_main(["--source", BUILTIN, "--out", str(copy), "--log-level", "WARNING"]) != 0:
            raise RuntimeError(f"ingesting {BUILTIN} into {copy} failed")
    barrier()  # the other ranks wait until the copy exists
    return str(copy)


def open_streams(data: DataConfig) -> tuple[CellStream, CellStream | None, list[Callable]]:
    """Return this rank's (training stream, validation stream or None, their close functions).

    The validation stream keeps its last partial batch; there is none when `val_fraction` is 0.
    """
    train = CellStream(data, "train", rank(), world_size())
    if data.val_fraction <= 0:
        return train, None, [train.close]
    val = CellStream(replace(data, drop_last=False), "val", rank(), world_size())
    return train, val, [train.close, val.close]

"""Latent cache: the frozen VAE's posterior means of every cell, written once, read by joinid.

Layout: `<run_dir>/latent_cache/z.npy` (float32 (N, M, D), N = cells of the training copy, row =
soma_joinid) and `meta.json` (written last: the VAE export it came from and the shape). Every
rank encodes its share of the cells into the shared memory-mapped file (disjoint rows), so the
cache costs one pass over the data whatever the world size. Training copies only: their
joinids are 0..N-1.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from atlasldm.data.config import DataConfig
from atlasldm.data.stream import CellStream
from atlasldm.models.pretrained import export_digest
from atlasldm.models.vae import VAE
from atlasldm.train.distributed import all_reduce_mean, barrier, is_main, rank, world_size
from atlasldm.train.vae_stage import cell_batch

META = "meta.json"


def build_cache(
    vae: VAE, vae_dir: Path, data: DataConfig, folder: Path, device: torch.device
) -> np.ndarray:
    """Return the cache as a read-only memmap (N, M, D), writing it first when missing or stale.

    Collective: every rank calls it.
    """
    if data.mode != "copy":
        raise ValueError("the latent cache needs a training copy (data.mode=copy)")
    n = int(json.loads((Path(data.source) / "manifest.json").read_text())["n_cells"])
    shape = (n, vae.cfg.num_inducing_points, vae.cfg.latent_dim)
    meta = {"vae_export": export_digest(vae_dir), "shape": list(shape), "source": data.source}
    path = folder / "z.npy"
    fresh = (folder / META).is_file() and json.loads((folder / META).read_text()) == meta
    if not fresh:
        if is_main():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / META).unlink(missing_ok=True)  # stale until rewritten
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape).flush()
        barrier()
        _encode_share(vae, replace(data, drop_last=False), path, device)
        barrier()  # all rows written before the marker
        if is_main():
            (folder / META).write_text(json.dumps(meta))
        barrier()
    return np.load(path, mmap_mode="r")


def _encode_share(vae: VAE, data: DataConfig, path: Path, device: torch.device) -> None:
    z_file = np.load(path, mmap_mode="r+")
    stream = CellStream(data, "all", rank(), world_size())
    with torch.no_grad():
        for batch in stream.iter_eval():
            if batch.num_cells:
                z = vae.encode(cell_batch(batch, device)).float().cpu().numpy()
                z_file[batch.soma_joinid.numpy()] = z
    stream.close()
    z_file.flush()


def cache_stats(cache: np.ndarray, joinids: np.ndarray, cells: int) -> dict:
    """Return the scalar mean/std of the first `cells` training cells (same on every rank)."""
    z = np.asarray(cache[np.sort(joinids)[:cells]], dtype=np.float64)
    stats = all_reduce_mean({"mean": float(z.mean()), "std": float(z.std())})  # identical anyway
    return {"mean": stats["mean"], "std": max(stats["std"], 1e-6), "cells": cells}


def lookup(cache: np.ndarray, joinids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Return the cached latents (B, M, D) float32 of the cells `joinids` on `device`."""
    return torch.from_numpy(np.asarray(cache[joinids.numpy()])).to(device)

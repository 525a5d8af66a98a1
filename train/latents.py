"""Latents of the frozen VAE for the latent stages: encoded per batch or read from a cache, and
standardised with a scalar mean/std estimated once from training cells.

Cache layout: `<run_dir>/latent_cache/z.npy` (float32 (N, M, D), N = cells of the training copy,
row = soma_joinid) and `meta.json` (written last: the VAE export it came from and the shape).
Every rank encodes its share of the cells into the shared memory-mapped file (disjoint rows), so
the cache costs one pass over the data whatever the world size. Training copies only: their
joinids are 0..N-1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atlasldm.data.batch import CsrBatch
from atlasldm.data.config import DataConfig
from atlasldm.data.stream import CellStream
from atlasldm.models.pretrained import export_digest
from atlasldm.train.batches import cell_batch
from atlasldm.train.config import TrainConfig
from atlasldm.train.distributed import all_reduce_mean, barrier, is_main, rank, world_size
from atlasldm.train.frozen_vae import FrozenVAE
from atlasldm.train.runner import run_dir_of

META = "meta.json"

Encode = Callable[[CsrBatch, torch.device], torch.Tensor]  # batch -> latents (B, M, D) fp32


@dataclass
class LatentSource:
    """The latents a latent stage trains on: `encode` and the scalar standardisation `stats`."""

    encode: Encode  # batch -> posterior means (B, M, D) fp32 on the device asked for
    stats: dict[str, Any]  # {"mean", "std", "cells"}; saved as latent_stats.json in exports

    def standardised(self, batch: CsrBatch, device: torch.device) -> torch.Tensor:
        """Return the batch's latents as (z - mean) / std on `device`."""
        return (self.encode(batch, device) - self.stats["mean"]) / self.stats["std"]


def latent_source(cfg: TrainConfig, vae: FrozenVAE, train: CellStream) -> LatentSource:
    """Return the latents of `cfg.stage.latents`: encoded per batch, or the run's cache.

    `cfg` is a latent stage's config: its `stage` section is a `FrozenVAEConfig`.
    """
    cells = cfg.stage.latent_stats_cells
    if cfg.stage.latents == "cache":
        cache = build_cache(vae, cfg.data, run_dir_of(cfg) / "latent_cache")
        stats = cache_stats(cache, train.source.joinids, cells)
        return LatentSource(lambda batch, dev: lookup(cache, batch.soma_joinid, dev), stats)

    def encode(batch: CsrBatch, dev: torch.device) -> torch.Tensor:
        return vae.model.encode(cell_batch(batch, dev)).float()  # posterior mean

    return LatentSource(encode, latent_stats(vae, cfg.data, cells))


def latent_stats(vae: FrozenVAE, data: DataConfig, cells: int) -> dict:
    """Return the scalar mean/std of standardisation, from the first training cells of each rank."""
    stream = CellStream(data, "train", rank(), world_size())
    total = {"sum": 0.0, "sq": 0.0, "n": 0.0}
    with torch.no_grad():
        for batch in stream.iter_eval():
            z = vae.model.encode(cell_batch(batch, vae.device)).double()
            total["sum"] += float(z.sum())
            total["sq"] += float(z.square().sum())
            total["n"] += z.numel()
            if total["n"] >= cells * z[0].numel() / world_size():
                break
    stream.close()
    mean = all_reduce_mean(total)
    mu = mean["sum"] / mean["n"]
    std = max(mean["sq"] / mean["n"] - mu * mu, 1e-12) ** 0.5
    return {"mean": mu, "std": std, "cells": cells}


def build_cache(vae: FrozenVAE, data: DataConfig, folder: Path) -> np.ndarray:
    """Return the cache as a read-only memmap (N, M, D), writing it first when missing or stale.

    Collective: every rank calls it.
    """
    if data.mode != "copy":
        raise ValueError("the latent cache needs a training copy (data.mode=copy)")
    n = int(json.loads((Path(data.source) / "manifest.json").read_text())["n_cells"])
    shape = (n, vae.model.config.num_latent_tokens, vae.model.config.latent_dim)
    meta = {"vae_export": export_digest(vae.folder), "shape": list(shape), "source": data.source}
    path = folder / "z.npy"
    fresh = (folder / META).is_file() and json.loads((folder / META).read_text()) == meta
    if not fresh:
        if is_main():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / META).unlink(missing_ok=True)  # stale until rewritten
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape).flush()
        barrier()
        _encode_share(vae, replace(data, drop_last=False), path)
        barrier()  # all rows written before the marker
        if is_main():
            (folder / META).write_text(json.dumps(meta))
        barrier()
    return np.load(path, mmap_mode="r")


def _encode_share(vae: FrozenVAE, data: DataConfig, path: Path) -> None:
    z_file = np.load(path, mmap_mode="r+")
    stream = CellStream(data, "all", rank(), world_size())
    with torch.no_grad():
        for batch in stream.iter_eval():
            if batch.num_cells:
                z = vae.model.encode(cell_batch(batch, vae.device)).float().cpu().numpy()
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

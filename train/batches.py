"""Batches between the data stream and the models: the host `CsrBatch` a stream yields becomes
the models' packed `CellBatch` on a device, and an empty micro-batch gets a one-cell stand-in."""

from __future__ import annotations

import numpy as np
import torch

from atlasldm.data.batch import CsrBatch
from atlasldm.models.batch import CellBatch


def cell_batch(batch: CsrBatch, device: torch.device, labels: bool = False) -> CellBatch:
    """Return the packed CellBatch of a host CsrBatch on `device`."""
    b = batch.to(device, non_blocking=True)
    cond = b.conditions if labels else None
    return CellBatch.from_packed(b.gene_ids, b.counts, b.cu_seqlens, b.library_size, labels=cond)


def stand_in_batch(batch: CsrBatch) -> CsrBatch:
    """Return a one-cell batch with `batch`'s condition attributes, to run in place of an empty one.

    Under ZeRO-3 every rank must gather the same parameters in the same order, and DeepSpeed's
    gradient hooks must fire on every rank, so a rank without cells cannot skip the forward.
    The cell is gene token 1 counted once, library size 1, condition codes 0; soma_joinid -1
    names no cell (a latent-cache lookup then reads the last row, which the zero weight drops).
    """
    return CsrBatch.from_numpy(
        gene_ids=np.array([1]),
        counts=np.array([1.0]),
        indptr=np.array([0, 1]),
        library_size=np.array([1.0]),
        conditions=np.zeros((1, len(batch.condition_names))),
        condition_names=batch.condition_names,
        soma_joinid=np.array([-1]),
    )

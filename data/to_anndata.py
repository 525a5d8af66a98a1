"""Read one split of a stream into an AnnData (raw counts), e.g. the held-out cells to evaluate on.

The cells are exactly those the training stream's hash split puts in `split` (the same
DataConfig selects the same cells), read in joinid order through the stream itself.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasldm.data.config import DataConfig
from atlasldm.data.split import Split
from atlasldm.data.stream import CellStream
from atlasldm.data.vocab import GeneVocab


def split_to_anndata(config: DataConfig, split: Split) -> ad.AnnData:
    """Return the cells of `split` with raw counts in X (float32 CSR) and labels in obs.

    obs holds every `config.condition_columns` attribute as strings, `library_size` and
    `soma_joinid`; var is the vocabulary (index feature_id, column feature_name).
    """
    config = replace(config, drop_last=False, max_genes=max(config.max_genes, 1 << 30))
    source = Path(config.source)
    vocab = GeneVocab.read(Path(config.vocab_path) if config.vocab_path else source / "genes.tsv")
    labels_path = Path(config.labels_path) if config.labels_path else source / "labels.json"
    labels = json.loads(labels_path.read_text())
    stream = CellStream(config, split, 0, 1)
    parts, conds, libs, ids = [], [], [], []
    try:
        for b in stream.iter_eval():
            cu = b.cu_seqlens.numpy()
            X = sp.csr_matrix(
                (b.counts.numpy(), b.gene_ids.numpy().astype(np.int64) - 1, cu),
                shape=(b.num_cells, len(vocab)),
            )
            parts.append(X)
            conds.append(b.conditions.numpy())
            libs.append(b.library_size.numpy())
            ids.append(b.soma_joinid.numpy())
    finally:
        stream.close()
    if not parts:
        raise ValueError(f"split {split!r} of {config.source} has no cells")
    joinid = np.concatenate(ids)
    order = np.argsort(joinid, kind="stable")
    obs = pd.DataFrame(index=pd.Index([str(j) for j in joinid[order]], name="obs_id"))
    codes = np.concatenate(conds)[order]
    for a, column in enumerate(config.condition_columns):
        values = np.array([*labels[column], ""], dtype=object)  # null code -> ""
        obs[column] = values[codes[:, a]]
    obs["library_size"] = np.concatenate(libs)[order].astype(np.float64)
    obs["soma_joinid"] = joinid[order]
    var = pd.DataFrame({"feature_name": list(vocab.feature_names)})
    var.index = pd.Index(list(vocab.feature_ids), name="feature_id")
    X = sp.vstack(parts, format="csr")[order].astype(np.float32)
    return ad.AnnData(X=X, obs=obs, var=var)

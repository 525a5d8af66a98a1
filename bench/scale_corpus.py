"""Synthetic corpora of the scale benchmark: generated and ingested once under `--cache`.

A corpus is a Census-layout experiment (`data.synthetic`), its training copy (`data.ingest`,
row store included) and the genes.tsv that direct mode reads; `build.json` records how long the
generation and the ingest took when they ran.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def corpus_paths(cache: Path, cells: int, genes: int, datasets: int) -> tuple[Path, Path, Path]:
    """Return (Census-layout experiment, training copy, build record) paths of a corpus."""
    root = Path(cache) / f"synthetic_{cells}x{genes}_d{datasets}"
    return root / "census_layout", root / "training_copy", root / "build.json"


def _ingest(census: Path, training: Path) -> None:
    from atlasldm.data import ingest

    conditions = ["--conditions", "dataset_id", "cell_type"]
    argv = ["--source", str(census), "--out", str(training), *conditions, "--resume"]
    argv += ["--log-level", "WARNING"]
    if ingest.main(argv) != 0:
        raise RuntimeError(f"ingest failed: {argv}")


def build_corpus(cache: Path, cells: int, genes: int, datasets: int, copy: bool = True) -> dict:
    """Generate (and ingest, when `copy`) a synthetic corpus once; reuse it when complete.

    Returns {census, copy (None when not built), vocab, generate_s, ingest_s (when built here or
    recorded by an earlier build)}.
    """
    from atlasldm.data.rowstore import has_row_store
    from atlasldm.data.synthetic import write_synthetic_experiment

    census, training, record = corpus_paths(cache, cells, genes, datasets)
    info = json.loads(record.read_text()) if record.is_file() else {}
    spec = f"cells={cells},genes={genes},datasets={datasets},cell_types=12,seed=0"
    t0 = time.perf_counter()
    reused = Path(str(census) + ".complete.json").is_file()
    write_synthetic_experiment(census, spec)
    if not reused:
        info["generate_s"] = time.perf_counter() - t0
    if copy and not (training / "manifest.json").is_file():
        t0 = time.perf_counter()
        _ingest(census, training)
        info["ingest_s"] = time.perf_counter() - t0
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(info))
    vocab = census.parent / "genes.tsv"
    if not vocab.is_file():
        _write_vocab(str(census), vocab)
    have_copy = (training / "manifest.json").is_file()
    return {
        "census": str(census),
        "copy": str(training) if have_copy else None,
        "row_store": have_copy and has_row_store(training),
        "vocab": str(vocab),
        **info,
    }


def _write_vocab(census_uri: str, path: Path) -> None:
    """genes.tsv of the experiment's var (feature_id, feature_name), for direct mode."""
    import tiledbsoma

    from atlasldm.data.vocab import GeneVocab

    with tiledbsoma.Experiment.open(census_uri) as exp:
        var = exp.ms["RNA"].var.read(column_names=["soma_joinid", "feature_id", "feature_name"])
        var = var.concat().sort_by("soma_joinid")
    GeneVocab(var["feature_id"].to_pylist(), var["feature_name"].to_pylist()).save(path)


def corpus_stats(census_uri: str) -> dict[str, Any]:
    """Cells, mean/min/max nonzeros per cell and dataset_id label counts (from obs)."""
    import tiledbsoma

    with tiledbsoma.Experiment.open(census_uri) as exp:
        obs = exp.obs.read(column_names=["soma_joinid", "dataset_id", "nnz"]).concat()
    nnz = obs["nnz"].to_numpy()
    labels = obs["dataset_id"].to_numpy(zero_copy_only=False).astype(str)
    counts = np.unique(labels, return_counts=True)[1]
    return {
        "cells": len(nnz),
        "mean_nnz": float(nnz.mean()),
        "min_nnz": int(nnz.min()),
        "max_nnz": int(nnz.max()),
        "dataset_counts": counts.tolist(),
    }


class Corpora:
    """The run's corpora by cell count, each built (or reused) on first use, with its stats."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.built: dict[int, dict] = {}  # N -> build_corpus's record + nnz figures
        self.stats: dict[int, dict] = {}  # N -> corpus_stats

    def get(self, n: int) -> dict:
        """The corpus of `n` cells; a training copy only when copy mode runs and n is allowed."""
        if n in self.built:
            return self.built[n]
        opts = self.opts
        want_copy = "copy" in opts.modes and (not opts.copy_max_cells or n <= opts.copy_max_cells)
        t = time.perf_counter()
        corpus = build_corpus(Path(opts.cache), n, opts.genes, opts.datasets, want_copy)
        stats = corpus_stats(corpus["census"])
        corpus.update({k: stats[k] for k in ("mean_nnz", "min_nnz", "max_nnz")})
        self.built[n], self.stats[n] = corpus, stats
        print(
            f"corpus N={n:,} x {opts.genes} genes ready in {time.perf_counter() - t:.0f} s"
            f" (mean nnz/cell {stats['mean_nnz']:.0f})",
            flush=True,
        )
        return corpus

"""One measured run of the loader benchmark: one loader on one experiment, in a fresh process.

Started by :mod:`atlasldm.bench.loader` as `python -m atlasldm.bench.loader worker ...`. The
optional `tiledbsoma_ml` and `scdataset` are imported only for their own runs; annbatch runs in
its own venv (:mod:`.loader_peers_annbatch`). Every loader goes through the same timed loop
(:func:`.loader_peers_measure.time_batches`); `--probe` then tests resume and epoch order.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from atlasldm.bench.loader_peers_measure import BATCH, order_differs, over_epochs, time_batches

ML_IO = 65536  # tiledbsoma-ml's default io_batch_size
RESUME_AT = (0.05, 0.37, 0.71, 0.98)  # epoch fractions of the resume latencies


def _ml_batches(args: argparse.Namespace) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (cells, nnz, dataset codes) per tiledbsoma-ml mini-batch (nnz -1 when dense)."""
    import tiledbsoma
    from tiledbsoma_ml import ExperimentDataset

    sparse = not args.dense
    # tiledbsoma-ml 0.1.0 shards by these variables (torch.distributed is not initialised here).
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(args.rank), str(args.world)
    exp = tiledbsoma.Experiment.open(args.uri)
    ds = ExperimentDataset(
        exp.axis_query("RNA"),
        layer_name="raw",
        obs_column_names=["dataset_id"],
        batch_size=BATCH,
        io_batch_size=args.io_batch,
        shuffle=True,
        shuffle_chunk_size=64,
        seed=args.seed,
        return_sparse_X=sparse,
    )
    vocab: dict[str, int] = {}

    def epoch(e: int) -> Iterator[tuple[int, int, np.ndarray]]:
        ds.set_epoch(e)  # its documented way to reshuffle
        for X, obs in ds:
            codes = np.array([vocab.setdefault(v, len(vocab)) for v in obs["dataset_id"]])
            # Counting a dense batch's nonzeros would be timed work tiledbsoma-ml never does.
            yield X.shape[0], (X.nnz if sparse else -1), codes

    yield from over_epochs(epoch)


def our_stream(args: argparse.Namespace) -> Any:
    """Our CellStream over the whole experiment, as the worker's options describe it."""
    from atlasldm.data.config import DataConfig
    from atlasldm.data.stream import CellStream

    cfg = DataConfig(
        source=args.uri,
        mode=args.mode,
        vocab_path=args.vocab if args.mode == "direct" else "",
        condition_columns=["dataset_id"],
        micro_batch=BATCH,
        seed=args.seed,
        reader_threads=args.threads,
        unknown_genes="drop",
        row_store=args.row_store,
    )
    return CellStream(cfg, split="all", rank=args.rank, world_size=args.world)


def _our_batches(args: argparse.Namespace) -> Iterator[tuple[int, int, np.ndarray]]:
    stream = our_stream(args)

    def epoch(e: int) -> Iterator[tuple[int, int, np.ndarray]]:
        stream.set_epoch(e)
        for b in stream:
            yield b.num_cells, b.num_tokens, b.conditions[:, 0].numpy()

    try:
        yield from over_epochs(epoch)
    finally:  # stop prefetching before the resume timings
        stream.close()


def resume_latency(args: argparse.Namespace) -> list[float]:
    """Seconds from constructing a stream and restoring a mid-epoch state to its first batch."""
    probe = our_stream(args)
    n, state = len(probe), probe.state_dict()
    probe.close()
    latencies = []
    for frac in RESUME_AT:
        t0 = time.perf_counter()
        stream = our_stream(args)
        stream.load_state_dict({**state, "batch_in_epoch": int(frac * (n - 1))})
        next(iter(stream))
        latencies.append(time.perf_counter() - t0)
        stream.close()
    return latencies


def exact_resume(args: argparse.Namespace, k: int = 2) -> bool:
    """Whether a stream restored from the state after batch k yields batch k + 1 exactly."""
    stream = our_stream(args)
    it = iter(stream)
    for _ in range(k):
        next(it)
    state = stream.state_dict()
    expected = next(it)
    stream.close()
    resumed = our_stream(args)
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    resumed.close()
    fields = ("soma_joinid", "gene_ids", "counts", "cu_seqlens")
    return all(
        np.array_equal(getattr(got, f).numpy(), getattr(expected, f).numpy()) for f in fields
    )


def our_probes(args: argparse.Namespace) -> dict[str, Any]:
    """Resume latencies, an exact-resume test, and whether epoch 1 starts with other cells."""
    out: dict[str, Any] = {"resume_first_batch_s": resume_latency(args)}
    out["resume_exact_tested"] = exact_resume(args)
    stream = our_stream(args)

    def epoch_ids(epoch: int) -> Iterator[np.ndarray]:
        stream.set_epoch(epoch)
        return (b.soma_joinid.numpy() for b in stream)

    out["order_differs_tested"] = order_differs(epoch_ids)
    stream.close()
    return out


def _batches(args: argparse.Namespace) -> Iterator[tuple[int, int, np.ndarray]]:
    if args.loader == "ml":
        return _ml_batches(args)
    if args.loader == "scdataset":
        from atlasldm.bench.loader_peers_scdataset import SETTINGS, scdataset_batches

        setting = list(SETTINGS.values())[args.setting]
        return scdataset_batches(args.uri, setting, args.seed, (args.rank, args.world))
    return _our_batches(args)


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time one loader on one experiment; returns its figures (run in a fresh process)."""
    import atlasldm.data.stream  # noqa: F401  (torch and TileDB imports are not the loader's start-up)

    if args.loader == "scdataset":  # nor are the peer's imports
        import anndata  # noqa: F401
        import scdataset  # noqa: F401

    out = time_batches(
        _batches(args), args.max_cells, args.seconds, args.codes_out, args.epoch_seconds
    )
    if args.probe and args.loader == "ours":
        out |= our_probes(args)
    elif args.probe and args.loader == "scdataset":
        from atlasldm.bench.loader_peers_scdataset import SETTINGS, scdataset_probes

        setting = list(SETTINGS.values())[args.setting]
        out |= scdataset_probes(args.uri, setting, args.seed, (args.rank, args.world))
    return out

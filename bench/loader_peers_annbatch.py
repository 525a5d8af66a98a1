"""annbatch in the loader benchmark: runs in its own Python >= 3.12 venv, by file path.

`python loader_peers_annbatch.py prepare --h5ad F --out S.zarr` writes annbatch's shuffled,
sharded zarr collection from the benchmark's h5ad with annbatch's own writer and its default
(recommended) chunk and shard sizes; `... run --store S.zarr ...` times annbatch's `Loader` on it
with the timed loop of :mod:`.loader_peers_measure` (loaded by path: the project is not
installed in this venv). The last stdout line of either is one JSON object. Settings are the
ones annbatch's README and walkthrough give: `chunk_size=32`, `preload_nchunks=256`,
`shuffle=True`, zarrs' codec pipeline for local files, no GPU preloading.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

CHUNK_SIZE = 32  # rows per contiguous read (README / walkthrough)
PRELOAD_NCHUNKS = 256  # chunks fetched per request (README / walkthrough)
PACKAGES = ("annbatch", "anndata", "zarr", "zarrs", "numpy", "scipy")


def _measure():
    """The shared timed loop, imported by path (see the module docstring)."""
    path = Path(__file__).with_name("loader_peers_measure.py")
    spec = importlib.util.spec_from_file_location("loader_peers_measure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _use_zarrs() -> None:
    import zarr

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    warnings.filterwarnings("ignore", category=UserWarning)  # vlen-utf8 / h5ad notices


def versions() -> dict[str, str]:
    """Installed versions of annbatch and the packages its speed depends on."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def prepare(args: argparse.Namespace) -> dict:
    """Write the shuffled collection with `DatasetCollection.add_adatas` (its defaults)."""
    from annbatch import DatasetCollection

    _use_zarrs()
    t0 = time.perf_counter()
    collection = DatasetCollection(args.out)
    collection.add_adatas([args.h5ad], shuffle=True, rng=np.random.default_rng(args.seed))
    return {"prepare_s": time.perf_counter() - t0, "versions": versions()}


def make_loader(args: argparse.Namespace):
    """annbatch's Loader over the collection, sharded with DistributedSampler when world > 1."""
    import anndata as ad
    from annbatch import DatasetCollection, Loader
    from annbatch.samplers import DistributedSampler, RandomSampler

    def load(group) -> ad.AnnData:  # X and the one label column only (README's advice)
        obs = ad.io.read_elem(group["obs"])[["dataset_id"]]
        return ad.AnnData(X=ad.io.sparse_dataset(group["X"]), obs=obs)

    shape = {"chunk_size": CHUNK_SIZE, "preload_nchunks": PRELOAD_NCHUNKS, "batch_size": 256}
    rng = np.random.default_rng(args.seed)
    common = {"return_index": True, "preload_to_gpu": False, "to": None}
    if args.world > 1:
        sampler = DistributedSampler(
            RandomSampler(**shape, rng=rng), dist_info=lambda: (args.rank, args.world)
        )
        loader = Loader(batch_sampler=sampler, **common)
    else:
        loader = Loader(**shape, shuffle=True, rng=rng, **common)
    with ad.settings.override(remove_unused_categories=False):
        return loader.use_collection(DatasetCollection(args.store, mode="r"), load_adata=load)


def _batches(args: argparse.Namespace, measure) -> Iterator[tuple[int, int, np.ndarray]]:
    loader = make_loader(args)  # built on the first next(): part of the time to first batch

    def epoch(_e: int) -> Iterator[tuple[int, int, np.ndarray]]:  # a new pass of the Loader
        for batch in loader:
            X = batch["X"]
            yield X.shape[0], X.nnz, batch["obs"]["dataset_id"].cat.codes.to_numpy()

    yield from measure.over_epochs(epoch)


def run(args: argparse.Namespace) -> dict:
    """Time the loader, then test whether a second pass starts with other cells."""
    measure = _measure()
    _use_zarrs()
    import annbatch  # noqa: F401  (imports are not the loader's start-up, as for every loader)

    out = measure.time_batches(
        _batches(args, measure), args.max_cells, args.seconds, args.codes_out, args.epoch_seconds
    )
    if args.probe:
        loader = make_loader(args)

        def epoch_ids(_epoch: int) -> Iterator[np.ndarray]:
            return (b["index"] for b in loader)  # a new pass of the same Loader object

        out["order_differs_tested"] = measure.order_differs(epoch_ids)
        # No state_dict / resume position in Loader or its samplers (API of the pinned version).
        out["resume_api"] = any(hasattr(loader, m) for m in ("state_dict", "load_state_dict"))
    out["versions"] = versions()
    return out


def build_parser() -> argparse.ArgumentParser:
    """`prepare` and `run` subcommands."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write the shuffled zarr collection")
    prep.add_argument("--h5ad", required=True)
    prep.add_argument("--out", required=True)
    prep.add_argument("--seed", type=int, default=0)
    timed = sub.add_parser("run", help="time the loader")
    timed.add_argument("--store", required=True)
    timed.add_argument("--seconds", type=float, default=60.0)
    timed.add_argument("--max-cells", type=int, default=200_000)
    timed.add_argument("--epoch-seconds", type=float, default=0.0)
    timed.add_argument("--seed", type=int, default=0)
    timed.add_argument("--rank", type=int, default=0)
    timed.add_argument("--world", type=int, default=1)
    timed.add_argument("--codes-out", default="")
    timed.add_argument("--probe", action="store_true", help="also test epoch order and resume")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; print its JSON as the last line."""
    args = build_parser().parse_args(argv)
    result = prepare(args) if args.command == "prepare" else run(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

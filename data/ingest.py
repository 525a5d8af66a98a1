"""Ingest command: source -> training copy (contracts.md §1), resumable and splittable.

    python launchers/ingest.py --source builtin:pbmc68k --out /data/pbmc_copy
    python launchers/ingest.py --source census --out /data/census_copy \
        --workers 8 --worker-index $i --resume          # one process per i; any order

Worker 0 stages the source (pbmc68k, synthetic, h5ad) and creates the copy schema; the others
wait for `.progress/plan.json`. Pass 1 (scatter): worker i spills source chunks i, i+K, ...,
then takes any chunk still unfinished (from the end), so it never waits on a crashed worker.
Pass 2 (gather): worker i writes blocks i, i+K, ..., each into the SOMA experiment and, at its
offsets, into the preallocated row store (data/rowstore.py); whoever finds every block done
writes the side files, manifest.json and rows.json (`--finalize` does only that step).
`--max-blocks N` stops after N gather blocks (tests use it to simulate a crash). See
data/shuffle_spill.py for the spill.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from data import materialize as mat
from data import shuffle_spill as spill
from data.rowstore import (
    RowLayout,
    RowWriter,
    complete_store,
    create_store,
    load_layout,
    row_store_dir,
)
from data.sources import Source, parse_source
from data.validate import IngestError, check_feature_ids

if TYPE_CHECKING:
    import tiledbsoma

logger = logging.getLogger(__name__)


def stage_h5ads(paths: Sequence[str], uri: str, layer: str | None = None) -> str:
    """Register and append h5ad files into one SOMA experiment at uri (reused when complete).

    Counts come from `layers[layer]` if given, else `.raw.X` if present, else `.X`. feature_id is
    var["feature_id"] if present, else the var index; dataset_id defaults to the file stem.
    Memory: one file at a time is loaded (registration reads obs/var only).
    """
    import tiledbsoma.io

    marker = Path(uri + ".complete.json")
    if marker.is_file() and json.loads(marker.read_text()) == {
        "paths": list(paths),
        "layer": layer,
    }:
        return uri
    if Path(uri).exists():
        shutil.rmtree(uri)
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    # The experiment must exist before registration: create its schema from the first file.
    first = _h5ad_counts(paths[0], layer, 0, len(paths), with_x=True)
    tiledbsoma.io.from_anndata(
        uri, first, measurement_name="RNA", X_layer_name="raw", ingest_mode="schema_only"
    )
    del first
    metas = [_h5ad_counts(p, layer, i, len(paths), with_x=False) for i, p in enumerate(paths)]
    rd = tiledbsoma.io.register_anndatas(
        uri, metas, measurement_name="RNA", obs_field_name="obs_id", var_field_name="var_id"
    )
    rd.prepare_experiment(uri)
    for i, path in enumerate(paths):
        adata = _h5ad_counts(path, layer, i, len(paths), with_x=True)
        tiledbsoma.io.from_anndata(
            uri, adata, measurement_name="RNA", X_layer_name="raw", registration_mapping=rd
        )
        logger.info("staged %s (%d cells)", path, adata.n_obs)
    marker.write_text(json.dumps({"paths": list(paths), "layer": layer}))
    return uri


def _h5ad_counts(path: str, layer: str | None, index: int, n_files: int, with_x: bool):
    """AnnData with counts in X (or no X), Census-named obs/var; validates gene ids."""
    import anndata as ad
    import scipy.sparse as sp

    src = ad.read_h5ad(path, backed="r")
    use_raw = layer is None and src.raw is not None
    var_src = src.raw.var if use_raw else src.var
    ids = var_src["feature_id"] if "feature_id" in var_src.columns else var_src.index
    ids = check_feature_ids(list(ids), f"{path} var")
    names = var_src["feature_name"].astype(str).tolist() if "feature_name" in var_src else ids
    var = ad.AnnData(var=var_src.copy()).var
    var.index = ids
    var.index.name = "var_id"
    var["feature_id"], var["feature_name"] = ids, names
    obs = src.obs.copy()
    if "dataset_id" not in obs.columns:
        obs["dataset_id"] = Path(path).stem
        logger.info("%s: no dataset_id column; using the file stem", path)
    # Obs ids must be unique across files for registration; prefix them when there are several.
    obs.index = [f"{index}:{x}" if n_files > 1 else str(x) for x in obs.index]
    obs.index.name = "obs_id"
    if not with_x:
        src.file.close()
        return ad.AnnData(obs=obs, var=var)
    if layer is not None:
        if layer not in src.layers:
            raise IngestError(f"{path}: layer {layer!r} not found; layers: {list(src.layers)}")
        X = src.layers[layer]
    else:
        X = src.raw.X if use_raw else src.X
    X = sp.csr_matrix(X[:] if hasattr(X, "shape") else X, dtype=np.float32)
    src.file.close()
    return ad.AnnData(X=X, obs=obs, var=var)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the ingest command."""
    p = argparse.ArgumentParser(description="Build a training copy from a source.")
    p.add_argument("--source", default="builtin:pbmc68k", help="see data/sources.py")
    p.add_argument("--out", required=True, help="training copy folder")
    p.add_argument("--obs-filter", default=None, help="SOMA value_filter on obs")
    p.add_argument("--obs-columns", nargs="*", default=[], help="extra obs columns to keep")
    p.add_argument("--conditions", nargs="*", default=None, help="label columns")
    p.add_argument("--genes", default=None, help="file with one feature_id per line")
    p.add_argument("--seed", type=int, default=0, help="permutation seed")
    p.add_argument("--cell-tile", type=int, default=256, help="X tile extent along cells")
    p.add_argument("--block-cells", type=int, default=16384, help="cells per written block")
    p.add_argument("--round-counts", action="store_true", help="round/clip non-integer counts")
    p.add_argument("--workers", type=int, default=1, help="number of ingest processes K")
    p.add_argument("--worker-index", type=int, default=0, help="this process, 0..K-1")
    p.add_argument("--resume", action="store_true", help="continue an interrupted ingest")
    p.add_argument("--finalize", action="store_true", help="only write side files + manifest")
    p.add_argument("--no-row-store", action="store_true",
                   help="skip the copy's memory-mapped row store (data/rowstore.py)")  # fmt: skip
    p.add_argument(
        "--max-blocks", type=int, default=None, help="stop after this many gather blocks"
    )
    p.add_argument("--organism", default="homo_sapiens", help="Census organism")
    p.add_argument("--census-uri", default=None, help="Census root (local folder or S3)")
    p.add_argument("--layer", default=None, help="h5ad layer with counts")
    p.add_argument("--measurement", default="RNA", help="SOMA measurement to read")
    p.add_argument("--x-layer", default="raw", help="SOMA X layer with raw counts")
    p.add_argument(
        "--tiledb-config",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="TileDB options, e.g. vfs.s3.no_sign_request=true vfs.s3.region=us-west-2",
    )
    p.add_argument("--wait-timeout", type=float, default=3600.0, help="s to wait for worker 0")
    p.add_argument("--log-level", default="INFO")
    return p


def _options(args: argparse.Namespace, source: Source) -> mat.CopyOptions:
    """CopyOptions from parsed arguments."""
    if not 0 <= args.worker_index < args.workers:
        raise IngestError(
            f"--worker-index {args.worker_index} not in [0, --workers={args.workers})"
        )
    if not 1 <= args.cell_tile <= 1 << 20 or args.block_cells < 1:
        raise IngestError("--cell-tile and --block-cells must be positive")
    genes = None
    if args.genes:
        genes = [ln.strip() for ln in Path(args.genes).read_text().splitlines() if ln.strip()]
    return mat.CopyOptions(
        obs_filter=args.obs_filter if args.obs_filter is not None else source.default_filter,
        obs_columns=list(args.obs_columns),
        conditions=None if args.conditions is None else list(args.conditions),
        genes=genes,
        seed=args.seed,
        block_cells=args.block_cells,
        cell_tile=args.cell_tile,
        round_counts=args.round_counts,
        measurement=args.measurement,
        layer=args.x_layer,
    )


def _get_plan(args, source: Source, opts: mat.CopyOptions, out: Path) -> dict:
    """Plan of this ingest: create it (worker 0), reuse it (--resume), or wait for it."""
    plan = mat.load_plan(out)
    if plan is not None:
        if args.worker_index == 0 and not args.resume:
            raise IngestError(
                f"{out} holds an unfinished ingest; rerun with --resume (same arguments) or "
                "remove the folder"
            )
        diff = [k for k, v in asdict(opts).items() if plan["options"].get(k) != v]
        if plan["source"] != source.describe():
            diff.append("source")
        if diff:
            raise IngestError(f"{out}: options {diff} differ from the interrupted ingest's plan")
        return plan
    if args.worker_index == 0:
        shutil.rmtree(row_store_dir(out), ignore_errors=True)  # no plan: none of it is trusted
        source.prepare(out)
        with source.open(out) as exp:
            return mat.plan_copy(exp, out, opts, source.describe())
    deadline = time.monotonic() + args.wait_timeout
    while (plan := mat.load_plan(out)) is None:
        if time.monotonic() > deadline:
            raise IngestError(f"{out}: worker 0 did not create the plan in {args.wait_timeout}s")
        time.sleep(2.0)
    return _get_plan(args, source, opts, out)


def _finish(out: Path, args: argparse.Namespace) -> dict:
    """Finalize the copy (manifest), then complete its row store unless --no-row-store."""
    manifest = mat.finalize(out)
    if not args.no_row_store:
        complete_store(out)
    return manifest


def _row_writer(out: Path, plan: dict) -> RowWriter:
    """Writer into the copy's row store, created at its final size on first use.

    Every worker derives the same layout from the scatter pass's per-chunk statistics (block
    nonzeros, largest count), so the dtypes and offsets agree without coordination.
    """
    folder = row_store_dir(out)
    layout = load_layout(folder)
    if layout is None:
        block_nnz, largest = spill.row_stats(out, plan)
        layout = RowLayout.from_block_nnz(plan["n_cells"], plan["options"]["block_cells"],
                                          block_nnz, plan["n_genes"], largest)  # fmt: skip
        layout = create_store(folder, layout)
    return RowWriter(folder, layout, mat.progress_dir(out))


def run(args: argparse.Namespace) -> dict | None:
    """Run one ingest worker; returns the manifest if this call completed the copy."""
    out = Path(args.out)
    if args.finalize:
        return _finish(out, args)
    if (out / "manifest.json").is_file():
        if args.resume:
            logger.info("%s is already a complete training copy", out)
            if not args.no_row_store:
                complete_store(out)
            return mat.open_copy_manifest(out)
        raise IngestError(f"{out} already holds a complete training copy; choose another --out")
    tiledb_config = dict(kv.split("=", 1) for kv in args.tiledb_config)
    source = parse_source(args.source, args.organism, args.census_uri, args.layer, tiledb_config)
    opts = _options(args, source)
    plan = _get_plan(args, source, opts, out)
    if not all(mat.block_done(out, b) for b in range(plan["n_blocks"])):
        with source.open(out) as exp:
            _scatter(exp, out, plan, args)
    mine = range(args.worker_index, plan["n_blocks"], args.workers)
    todo = [b for b in mine if not mat.block_done(out, b)]
    if args.max_blocks is not None:  # simulates a crash in the gather pass (tests)
        todo = todo[: args.max_blocks]
    _gather(out, plan, todo, args)
    if all(mat.block_done(out, b) for b in range(plan["n_blocks"])):
        return _finish(out, args)
    logger.info("worker %d done; waiting for other blocks before finalize", args.worker_index)
    return None


def _gather(out: Path, plan: dict, todo: list[int], args: argparse.Namespace) -> None:
    """Pass 2: write the blocks `todo`, their rows included unless --no-row-store."""
    if not todo:
        return
    rows = None if args.no_row_store else _row_writer(out, plan)
    cells = sum(hi - lo for lo, hi in (mat.block_range(plan, b) for b in todo))
    desc = f"gather w{args.worker_index}"
    try:
        with tqdm(total=int(cells), unit="cell", unit_scale=True, desc=desc, disable=None) as bar:
            for b in todo:
                bar.update(spill.gather_block(out, plan, b, rows))
    finally:
        if rows is not None:
            rows.close()


def _scatter(exp: tiledbsoma.Experiment, out: Path, plan: dict, args: argparse.Namespace) -> None:
    """Pass 1: spill every source chunk not yet done, own chunks first.

    A worker then takes the other workers' unfinished chunks, from the end (their owners go
    forward, so two workers rarely meet on one): the gather pass needs every chunk, and a chunk
    done twice is rewritten with identical content. So no worker waits on a crashed one.
    """
    n = plan["n_blocks"]
    mine = list(range(args.worker_index, n, args.workers))
    others = [c for c in reversed(range(n)) if c % args.workers != args.worker_index]
    todo = [c for c in [*mine, *others] if not spill.scatter_done(out, c)]
    if not todo:
        return
    desc = f"scatter w{args.worker_index}"
    with tqdm(total=len(todo), unit="chunk", desc=desc, disable=None) as bar:
        for c in todo:
            if not spill.scatter_done(out, c):  # another worker may have done it meanwhile
                spill.scatter_chunk(exp, out, plan, c)
            bar.update(1)
    missing = [c for c in range(n) if not spill.scatter_done(out, c)]
    if missing:  # only if spill files were deleted under us
        raise IngestError(f"{out}: scatter chunks {missing[:5]} missing; rerun with --resume")
    logger.info("scatter done: spill holds %.2f GB", spill.spill_bytes(out) / 1e9)


def run_ingest(argv: Sequence[str] | None = None) -> dict | None:
    """Parse argv and run one worker; raises IngestError on bad input (used by tests)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(message)s")
    manifest = run(args)
    if manifest is not None:
        print(
            f"training copy {args.out}: {manifest['n_cells']} cells x {manifest['n_genes']} genes"
        )
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """Command entry point: 0 on success, 2 with a one-line message on bad input."""
    try:
        run_ingest(argv)
    except IngestError as err:
        logger.error("ingest failed: %s", err)
        return 2
    return 0

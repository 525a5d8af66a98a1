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
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from atlasldm.data import materialize as mat
from atlasldm.data import shuffle_spill as spill
from atlasldm.data.leftovers import remove_leftovers
from atlasldm.data.rowstore import (
    RowLayout,
    RowWriter,
    complete_store,
    create_store,
    load_layout,
    row_store_dir,
)
from atlasldm.data.sources import Source, parse_source, same_source
from atlasldm.data.validate import IngestError

if TYPE_CHECKING:
    import tiledbsoma

logger = logging.getLogger(__name__)


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
    p.add_argument(
        "--no-row-store",
        action="store_true",
        help="skip the copy's memory-mapped row store (data/rowstore.py)",
    )
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
        changed = source.changed_inputs(out)
        if not changed:
            return plan
        if args.worker_index != 0:
            raise IngestError(
                f"{changed[0]} changed since the interrupted ingest into {out} began; rerun "
                "worker 0 with --resume first (it starts over from the new content), then this one"
            )
        logger.warning(
            "%s changed since the interrupted ingest began: starting over from its current content",
            changed[0],
        )
        shutil.rmtree(mat.progress_dir(out))  # the plan and spill describe the old content
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
    remove_leftovers(out)
    return manifest


def _resume_complete(out: Path, source: Source, args: argparse.Namespace) -> dict:
    """--resume on a finished copy: only the same source may claim it; tidy what a kill left."""
    manifest = mat.open_copy_manifest(out)
    if not same_source(manifest["source"], source.describe()):
        raise IngestError(
            f"{out} is a finished copy of source {manifest['source']['source']!r}, not of "
            f"{source.text!r}; choose another --out for the new source"
        )
    logger.info("%s is already a complete training copy", out)
    if not args.no_row_store:
        complete_store(out)
    remove_leftovers(out)
    return mat.open_copy_manifest(out)


def _row_writer(out: Path, plan: dict) -> RowWriter:
    """Writer into the copy's row store, created at its final size on first use.

    Every worker derives the same layout from the scatter pass's per-chunk statistics (block
    nonzeros, largest count), so the dtypes and offsets agree without coordination.
    """
    folder = row_store_dir(out)
    layout = load_layout(folder)
    if layout is None:
        block_nnz, largest = spill.row_stats(out, plan)
        layout = RowLayout.from_block_nnz(
            plan["n_cells"], plan["options"]["block_cells"], block_nnz, plan["n_genes"], largest
        )
        layout = create_store(folder, layout)
    return RowWriter(folder, layout, mat.progress_dir(out))


def run(args: argparse.Namespace) -> dict | None:
    """Run one ingest worker; returns the manifest if this call completed the copy."""
    out = Path(args.out)
    if args.finalize:
        return _finish(out, args)
    tiledb_config = dict(kv.split("=", 1) for kv in args.tiledb_config)
    source = parse_source(args.source, args.organism, args.census_uri, args.layer, tiledb_config)
    if (out / "manifest.json").is_file():
        if args.resume:
            return _resume_complete(out, source, args)
        raise IngestError(f"{out} already holds a complete training copy; choose another --out")
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

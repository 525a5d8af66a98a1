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

Bad input (`IngestError`) ends a single-worker ingest with one line, `error: ...`, exit status 2,
and removes the output folder if this run created it. Both passes report progress
(`atlasldm.progress`): a bar on a terminal, a line with rate and ETA every 30 s in a log file.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

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
from atlasldm.data.vocab import GeneVocab
from atlasldm.progress import Progress

if TYPE_CHECKING:
    import tiledbsoma

logger = logging.getLogger(__name__)
CLI_REPORTED = "reported_on_stderr"  # LogRecord attribute of the error line main prints itself


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the ingest command (every option's help shows its default)."""
    p = argparse.ArgumentParser(
        description="Build a training copy (docs/contracts.md §1) from a source.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    add(
        "--source",
        default="builtin:pbmc68k",
        help="builtin:pbmc68k, synthetic:cells=N,genes=G,..., census[:VERSION], an .h5ad file, "
        "list (a.h5ad,b.h5ad) or folder, or a SOMA experiment path or URI",
    )
    add(
        "--out",
        required=True,
        default=argparse.SUPPRESS,  # required: no default to show
        help="training copy folder to write (a POSIX path, not a URI); required",
    )
    add(
        "--obs-filter",
        default=None,
        help="SOMA value_filter on obs (unset: all cells; census: is_primary_data == True)",
    )
    add("--obs-columns", nargs="*", default=[], help="extra obs columns to keep")
    add(
        "--conditions",
        nargs="*",
        default=None,
        help=f"label columns (unset: {' '.join(mat.DEFAULT_CONDITIONS)}, where present)",
    )
    add("--genes", default=None, help="gene list: one feature_id per line, or a genes.tsv")
    add("--seed", type=int, default=0, help="seed of the cell permutation")
    add("--cell-tile", type=int, default=256, help="X tile extent along cells")
    add("--block-cells", type=int, default=16384, help="cells per written block")
    add("--round-counts", action="store_true", help="round/clip non-integer or negative counts")
    add("--workers", type=int, default=1, help="number of ingest processes K")
    add("--worker-index", type=int, default=0, help="this process, 0..K-1")
    add("--resume", action="store_true", help="continue an interrupted ingest")
    add("--finalize", action="store_true", help="only write side files + manifest")
    add("--no-row-store", action="store_true", help="skip the row store (data/rowstore.py)")
    add("--max-blocks", type=int, default=None, help="stop after this many gather blocks (tests)")
    add("--organism", default="homo_sapiens", help="Census organism (census source)")
    add("--census-uri", default=None, help="local or S3 Census root (unset: by --source version)")
    add("--layer", default=None, help="h5ad layer with counts (unset: .raw.X, else .X)")
    add("--measurement", default="RNA", help="SOMA measurement to read")
    add("--x-layer", default="raw", help="SOMA X layer with raw counts")
    add(
        "--tiledb-config",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="TileDB options, e.g. vfs.s3.no_sign_request=true vfs.s3.region=us-west-2",
    )
    add("--wait-timeout", type=float, default=3600.0, help="seconds to wait for worker 0's plan")
    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    add("--log-level", default="INFO", choices=levels, help="INFO and below show progress")
    return p


def _tiledb_config(pairs: Sequence[str]) -> dict[str, str]:
    """`--tiledb-config KEY=VALUE ...` as a dict."""
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        raise IngestError(f"--tiledb-config expects KEY=VALUE, got {bad[0]!r}")
    return dict(kv.split("=", 1) for kv in pairs)


def _gene_list(path: str | None) -> list[str] | None:
    """The feature ids of `--genes` (a plain list or a genes.tsv), or None."""
    if not path:
        return None
    try:
        return GeneVocab.read(path).feature_ids
    except ValueError as err:
        raise IngestError(f"--genes: {err}") from None


def _options(args: argparse.Namespace, source: Source) -> mat.CopyOptions:
    """CopyOptions from parsed arguments."""
    if not 0 <= args.worker_index < args.workers:
        raise IngestError(
            f"--worker-index {args.worker_index} not in [0, --workers={args.workers})"
        )
    if not 1 <= args.cell_tile <= 1 << 20 or args.block_cells < 1:
        raise IngestError("--cell-tile and --block-cells must be positive")
    genes = _gene_list(args.genes)
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
    if "://" in args.out:
        raise IngestError(
            f"--out {args.out}: a training copy is written to a POSIX filesystem path (local or "
            "shared, e.g. NFS/Lustre), not a URI; write it there, then copy it where it is used"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise IngestError(f"--out {out} is a file; give a folder for the training copy")
    if args.finalize:
        return _finish(out, args)
    tiledb_config = _tiledb_config(args.tiledb_config)
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


def _progress(desc: str, total: int, unit: str) -> Progress | None:
    """Progress of a pass, or None when the log level hides INFO (--log-level WARNING)."""
    return Progress(desc, total=total, unit=unit) if logger.isEnabledFor(logging.INFO) else None


def _gather(out: Path, plan: dict, todo: list[int], args: argparse.Namespace) -> None:
    """Pass 2: write the blocks `todo`, their rows included unless --no-row-store."""
    if not todo:
        return
    rows = None if args.no_row_store else _row_writer(out, plan)
    cells = sum(hi - lo for lo, hi in (mat.block_range(plan, b) for b in todo))
    progress = _progress(f"ingest gather w{args.worker_index}", int(cells), "cells")
    try:
        for b in todo:
            written = spill.gather_block(out, plan, b, rows)
            if progress is not None:
                progress.update(written)
    finally:
        if rows is not None:
            rows.close()
    if progress is not None:  # closed on success only: a failed run ends with its one error line
        progress.close()


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
    sizes = {c: hi - lo for c, (lo, hi) in ((c, mat.block_range(plan, c)) for c in todo)}
    progress = _progress(f"ingest scatter w{args.worker_index}", sum(sizes.values()), "cells")
    for c in todo:
        if not spill.scatter_done(out, c):  # another worker may have done it meanwhile
            spill.scatter_chunk(exp, out, plan, c)
        if progress is not None:
            progress.update(sizes[c])
    if progress is not None:
        progress.close()
    missing = [c for c in range(n) if not spill.scatter_done(out, c)]
    if missing:  # only if spill files were deleted under us
        raise IngestError(f"{out}: scatter chunks {missing[:5]} missing; rerun with --resume")
    logger.info("scatter done: spill holds %.2f GB", spill.spill_bytes(out) / 1e9)


def _created_root(out: Path) -> Path | None:
    """The outermost folder a run writing `out` would create (None if `out` exists already)."""
    if out.exists():
        return None
    root = out.absolute()
    while not root.parent.exists():
        root = root.parent
    return root


def _remove_output(out: Path, created: Path | None) -> None:
    """Undo a refused single-worker run: remove `out` (or an empty out's new contents) and the
    parent folders it created while they are empty, so bad input leaves nothing behind.

    Parents are only removed when empty: another ingest may have started writing beside `out`.
    """
    if created is None:
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        return
    shutil.rmtree(out, ignore_errors=True)
    folder = out.absolute().parent
    while folder != created.parent:
        try:
            folder.rmdir()
        except OSError:  # missing (never made), or holding something else: keep it
            return
        folder = folder.parent


def run_ingest(argv: Sequence[str] | None = None) -> dict | None:
    """Parse argv and run one worker; raises IngestError on bad input (used by tests).

    A refused single-worker run into a new or empty folder leaves it as it was (`_remove_output`);
    an interrupted one (any other error, a kill) keeps its state for --resume.
    """
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    out = Path(args.out)
    created = _created_root(out)
    undo = args.workers == 1 and not args.finalize
    undo = undo and (created is not None or (out.is_dir() and not any(out.iterdir())))
    try:
        manifest = run(args)
    except IngestError:
        if undo:
            _remove_output(out, created)
        raise
    if manifest is not None:
        print(
            f"training copy {args.out}: {manifest['n_cells']} cells x {manifest['n_genes']} genes"
        )
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """Command entry point: 0 on success; bad input: one line `error: ...` on stderr, exit 2.

    The error is also logged (level ERROR) for callers that capture logs; the log's own stream
    handler skips it, so the terminal shows the line once.
    """
    try:
        run_ingest(argv)
    except IngestError as err:
        logger.error("ingest failed: %s", err, extra={CLI_REPORTED: True})
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


def _not_reported(record: logging.LogRecord) -> bool:
    return not getattr(record, CLI_REPORTED, False)


def _configure_logging(level: str) -> None:
    """Log to stderr at `level`, unless the caller configured logging (tests, a launcher).

    The handler skips the error record `main` prints itself as `error: ...`.
    """
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.addFilter(_not_reported)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s", handlers=[handler])


if __name__ == "__main__":
    sys.exit(main())

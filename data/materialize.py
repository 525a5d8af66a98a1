"""Training-copy builder: a globally permuted, training-tiled SOMA experiment (contracts.md §1).

Three steps, safe to split across processes:

1. `plan_copy` (worker 0 only): validate the query, draw the permutation, fix the label
   vocabularies, create the empty copy experiment, then write `.progress/plan.json` last. Other
   workers wait for plan.json, so the schema is created exactly once.
2. Scatter/gather (data/shuffle_spill.py, any worker): the source is read once in sorted joinid
   chunks, validated and spilled to `.progress/spill/` grouped by output block (temporary disk
   about 8 bytes per stored count plus the obs rows); then `write_block` writes output rows
   [b*B, (b+1)*B) = source rows order[b*B:(b+1)*B] as one X and one obs fragment, then
   `.progress/block_<b>.npz` (side values) and `.progress/block_<b>.done`; with a row store, the
   block's rows go to `<copy>/rows/` first (data/rowstore.py). Rewriting a block
   writes the same coordinates, so a rerun after a crash is idempotent. Memory: one chunk or
   block at a time, about 60 bytes per stored count plus its obs rows (16,384 cells x 2,000
   counts per cell: about 2 GB).
3. `finalize` (any worker, once all blocks are done): side/*.npy, genes.tsv, labels.json and,
   last and atomically, manifest.json, then the spill is deleted. Without manifest.json the
   copy is refused by readers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tiledbsoma

from atlasldm.data import soma
from atlasldm.data.copy_files import damaged, non_row_files, record_files, sampling_recipe
from atlasldm.data.validate import IngestError, check_obs_columns, select_genes
from atlasldm.data.vocab import GeneVocab, atomic_write_text, encode_labels, save_labels

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CENSUS_OBS_COLUMNS = (
    "dataset_id",
    "cell_type",
    "tissue",
    "assay",
    "donor_id",
    "is_primary_data",
)
DEFAULT_CONDITIONS = ("cell_type", "dataset_id")
# Our writes pass coordinates already in global order; TileDB's own sort is the costliest part.
GLOBAL_ORDER = {"tiledb": {"write": {"sort_coords": False}}}
RESERVED_OBS_COLUMNS = ("soma_joinid", "source_joinid", "library_size", "nnz")
PERMUTATION_RECIPE = (
    "order = sorted query obs soma_joinids [numpy.random.default_rng(seed).permutation(n_cells)];"
    " copy row k = source row order[k]"
)


@dataclass
class CopyOptions:
    """What to copy and how; everything here is recorded in plan.json and manifest.json."""

    obs_filter: str | None = None  # SOMA value_filter on obs; None = all cells
    obs_columns: list[str] = field(default_factory=list)  # extra obs columns to keep
    conditions: list[str] | None = None  # label columns; None = DEFAULT_CONDITIONS
    genes: list[str] | None = None  # restrict var to these feature ids; None = all genes
    seed: int = 0  # permutation seed
    block_cells: int = 16384  # output rows per block (one fragment per block)
    cell_tile: int = 256  # X tile extent along cells
    round_counts: bool = False  # round counts and clip negatives instead of failing
    measurement: str = "RNA"
    layer: str = "raw"


def progress_dir(out: Path) -> Path:
    """Folder of plan, per-block side values and done markers."""
    return Path(out) / ".progress"


def copy_x_platform_config(cell_tile: int, n_genes: int) -> dict[str, Any]:
    """Training layout of X: cell tile x all genes, capacity 131072, zstd 3 + byte shuffle."""
    return {
        "tiledb": {
            "create": {
                "capacity": 131072,
                "cell_order": "row-major",
                "tile_order": "row-major",
                "dims": {"soma_dim_0": {"tile": cell_tile}, "soma_dim_1": {"tile": n_genes}},
                "attrs": {
                    "soma_data": {
                        "filters": ["ByteShuffleFilter", {"_type": "ZstdFilter", "level": 3}]
                    }
                },
            }
        }
    }


def _value_type(t: pa.DataType) -> pa.DataType:
    """Stored type of an obs column in the copy: categories decoded, strings as large_string."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.large_string()
    return t


def _obs_plan(src_schema: pa.Schema, opts: CopyOptions) -> tuple[list[dict], list[str]]:
    """Output obs columns [{name, type, fill}] and the condition columns; validates requests."""
    available = [n for n in src_schema.names if n != "soma_joinid"]
    conditions = list(opts.conditions) if opts.conditions is not None else list(DEFAULT_CONDITIONS)
    requested = list(opts.obs_columns) + (list(opts.conditions or []))
    reserved = sorted(set(requested) & set(RESERVED_OBS_COLUMNS))
    if reserved:
        raise IngestError(
            f"obs column(s) {reserved} are computed by ingest and cannot be copied from the "
            "source; remove them from --obs-columns/--conditions"
        )
    check_obs_columns(requested, available, "source obs")
    names = list(dict.fromkeys([*CENSUS_OBS_COLUMNS, *opts.obs_columns, *conditions]))
    cols = []
    for name in names:
        if name in available:
            cols.append({"name": name, "type": str(_value_type(src_schema.field(name).type))})
            continue
        fill: Any = True if name == "is_primary_data" else "unknown"
        logger.warning("obs column %r absent in the source: filled with %r", name, fill)
        cols.append(
            {"name": name, "type": "bool" if fill is True else "large_string", "fill": fill}
        )
    return cols, conditions


def _labels(tbl: pa.Table, conditions: list[str]) -> dict[str, list[str]]:
    """Sorted label vocabularies of the condition columns (nulls excluded)."""
    labels = {}
    for col in conditions:
        if col not in tbl.column_names:
            labels[col] = ["unknown"]
            continue
        arr = tbl.column(col)
        if pa.types.is_dictionary(arr.type):
            arr = arr.cast(arr.type.value_type)
        uniq = pc.unique(arr.drop_null()).to_pylist()
        labels[col] = sorted({str(v) for v in uniq})
    return labels


def plan_copy(exp: tiledbsoma.Experiment, out: Path, opts: CopyOptions, source: dict) -> dict:
    """Validate, permute, fix vocabularies, create the copy experiment and write plan.json."""
    out, prog = Path(out), progress_dir(out)
    if opts.measurement not in exp.ms or opts.layer not in exp.ms[opts.measurement].X:
        have = {m: sorted(exp.ms[m].X.keys()) for m in exp.ms if "X" in exp.ms[m]}
        raise IngestError(
            f"source has no X layer {opts.measurement}/{opts.layer}; available: {have}; "
            "fix --measurement/--x-layer"
        )
    obs_cols, conditions = _obs_plan(exp.obs.schema, opts)
    src_var = soma.var_table(exp, opts.measurement)
    var = select_genes(src_var, opts.genes)
    present = [c for c in conditions if c in exp.obs.schema.names]
    try:
        tbl = soma.query_obs(exp, opts.obs_filter, present)
    except Exception as err:  # tiledbsoma raises several types for a bad filter
        raise IngestError(f"obs filter {opts.obs_filter!r} failed: {err}") from err
    if tbl.num_rows == 0:
        raise IngestError(
            f"obs filter {opts.obs_filter!r} matches no cells; check the column names and values"
        )
    ids = tbl.column("soma_joinid").to_numpy()
    order = ids[np.random.default_rng(opts.seed).permutation(ids.size)]
    prog.mkdir(parents=True, exist_ok=True)
    np.save(prog / "order.npy", order)
    np.save(prog / "var_all.npy", src_var.column("soma_joinid").to_numpy())
    np.save(prog / "var_keep.npy", var.column("soma_joinid").to_numpy())
    n_genes = var.num_rows
    _create_copy(out / "experiment", obs_cols, ids.size, var, opts.cell_tile)
    plan = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "options": asdict(opts),
        "n_cells": int(ids.size),
        "n_genes": int(n_genes),
        "n_blocks": int(-(-ids.size // opts.block_cells)),
        "obs_columns": obs_cols,
        "conditions": conditions,
        "labels": _labels(tbl, conditions),
    }
    atomic_write_text(prog / "plan.json", json.dumps(plan, indent=1))
    logger.info("planned copy: %d cells x %d genes, %d blocks", ids.size, n_genes, plan["n_blocks"])
    return plan


def load_plan(out: Path) -> dict | None:
    """The plan of an ingest in progress, or None if planning has not finished."""
    path = progress_dir(out) / "plan.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _create_copy(uri: Path, obs_cols: list[dict], n_cells: int, var: pa.Table, tile: int) -> None:
    """Create the empty copy experiment (obs, ms/RNA/var written, X/raw with training tiles)."""
    if uri.exists():  # a crash before plan.json: nothing in it is trusted
        shutil.rmtree(uri)
    fields = [pa.field("soma_joinid", pa.int64()), pa.field("source_joinid", pa.int64())]
    fields += [pa.field(c["name"], _parse_type(c["type"])) for c in obs_cols]
    fields += [pa.field("library_size", pa.float32()), pa.field("nnz", pa.int32())]
    n_genes = var.num_rows
    ids = [str(x) for x in var.column("feature_id").to_pylist()]
    has_name = "feature_name" in var.column_names
    names = [str(x) for x in var.column("feature_name").to_pylist()] if has_name else ids
    var_tbl = pa.table(
        {
            "soma_joinid": pa.array(np.arange(n_genes, dtype=np.int64)),
            "feature_id": pa.array(ids, pa.large_string()),
            "feature_name": pa.array(names, pa.large_string()),
        }
    )
    with tiledbsoma.Experiment.create(str(uri)) as exp:
        exp.add_new_dataframe("obs", schema=pa.schema(fields), domain=[(0, n_cells - 1)])
        rna = exp.add_new_collection("ms").add_new_collection("RNA", tiledbsoma.Measurement)
        rna.add_new_dataframe("var", schema=var_tbl.schema, domain=[(0, n_genes - 1)])
        rna["var"].write(var_tbl)
        rna.add_new_collection("X").add_new_sparse_ndarray(
            "raw",
            type=pa.float32(),
            shape=(n_cells, n_genes),
            platform_config=copy_x_platform_config(tile, n_genes),
        )


def _parse_type(name: str) -> pa.DataType:
    """Arrow type from its str() form (only the primitive types obs columns use)."""
    aliases = {"float": pa.float32(), "double": pa.float64(), "string": pa.large_string()}
    return aliases.get(name) or pa.type_for_alias(name)


def block_range(plan: dict, b: int) -> tuple[int, int]:
    """Output rows [lo, hi) of block b."""
    bs = plan["options"]["block_cells"]
    return b * bs, min((b + 1) * bs, plan["n_cells"])


def block_done(out: Path, b: int) -> bool:
    """Whether block b has been fully written."""
    return (progress_dir(out) / f"block_{b:06d}.done").is_file()


def spill_dir(out: Path) -> Path:
    """Folder of the scatter/gather spill files (data/shuffle_spill.py); removed by finalize."""
    return progress_dir(out) / "spill"


def source_obs(exp: tiledbsoma.Experiment, plan: dict, sorted_ids: np.ndarray) -> pa.Table:
    """Source obs rows (soma_joinid + copied columns) of sorted joinids, in their copy types.

    Categoricals are decoded here so that tables read from different chunks concatenate.
    """
    cols = [c for c in plan["obs_columns"] if "fill" not in c]
    tbl = soma.read_obs(exp, sorted_ids, [c["name"] for c in cols])
    arrays: dict[str, Any] = {"soma_joinid": tbl.column("soma_joinid")}
    for c in cols:
        arr = tbl.column(c["name"])
        if pa.types.is_dictionary(arr.type):
            arr = arr.cast(arr.type.value_type)
        arrays[c["name"]] = arr.cast(_parse_type(c["type"]))
    return pa.table(arrays)


def write_block(
    out: Path, plan: dict, b: int, X: Any, library: np.ndarray, src_obs: pa.Table, rows=None
) -> int:
    """Write output block b from its rows in output order; returns the number of cells written.

    Args:
        out: the copy folder.
        plan: the ingest plan.
        b: output block index.
        X: scipy CSR (block cells x kept genes), validated counts, sorted column indices.
        library: float32 library size of each row (sum over all source genes).
        src_obs: `source_obs` rows of the block, in output order.
        rows: a `rowstore.RowWriter` that gets the block's rows before the done marker, or None.
    """
    out, prog = Path(out), progress_dir(out)
    lo, hi = block_range(plan, b)
    ids = np.load(prog / "order.npy", mmap_mode="r")[lo:hi].astype(np.int64)
    if not np.array_equal(src_obs.column("soma_joinid").to_numpy(), ids):
        raise RuntimeError(f"block {b}: gathered rows do not match the permutation")
    if rows is not None:  # before the done marker: a done block has its rows (or --no-row-store)
        rows.write_csr(b, X)
    X = X.tocoo()  # row-major with sorted columns = global order (one tile spans all genes)
    nnz = np.bincount(X.row, minlength=ids.size).astype(np.int32)
    copy_uri = str(out / "experiment")
    with tiledbsoma.SparseNDArray.open(f"{copy_uri}/ms/RNA/X/raw", mode="w") as arr:
        table = pa.table(
            {
                "soma_dim_0": X.row.astype(np.int64) + lo,
                "soma_dim_1": X.col.astype(np.int64),
                "soma_data": X.data.astype(np.float32),
            }
        )
        if table.num_rows:  # a block can hold no counts of the kept genes
            arr.write(table, platform_config=GLOBAL_ORDER)
    obs, codes = _block_obs(plan, src_obs, lo)
    obs = obs.append_column("library_size", pa.array(library)).append_column("nnz", pa.array(nnz))
    with tiledbsoma.DataFrame.open(f"{copy_uri}/obs", mode="w") as df:
        df.write(obs.select(df.schema.names).cast(df.schema), platform_config=GLOBAL_ORDER)
    tmp = prog / f".block_{b:06d}.{os.getpid()}.npz"
    with open(tmp, "wb") as fh:
        np.savez(fh, library_size=library, nnz=nnz, source_joinid=ids, **codes)
    os.replace(tmp, prog / f"block_{b:06d}.npz")
    (prog / f"block_{b:06d}.done").touch()
    return int(ids.size)


def _block_obs(plan: dict, src: pa.Table, lo: int) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """Obs rows of a block in output order, and the condition codes (null -> len(labels))."""
    n = src.num_rows
    out: dict[str, Any] = {
        "soma_joinid": pa.array(np.arange(lo, lo + n, dtype=np.int64)),
        "source_joinid": src.column("soma_joinid"),
    }
    for c in plan["obs_columns"]:
        typ = _parse_type(c["type"])
        if "fill" in c:
            out[c["name"]] = pa.array([c["fill"]] * n, typ)
            continue
        out[c["name"]] = src.column(c["name"]).cast(typ)
    codes = {}
    for col in plan["conditions"]:
        vocab = plan["labels"][col]
        arr = out[col]
        valid = np.array(pc.is_valid(arr).to_pylist(), dtype=bool)
        vals = [str(v) for v in arr.to_pylist()]
        code = np.full(n, len(vocab), dtype=np.int32)
        if valid.any():
            code[valid] = encode_labels([v for v, ok in zip(vals, valid, strict=True) if ok], vocab)
        codes[f"codes_{col}"] = code
    return pa.table(out), codes


def finalize(out: Path) -> dict:
    """Write side/*.npy, genes.tsv, labels.json and finally manifest.json; returns the manifest."""
    out = Path(out)
    plan = load_plan(out)
    if plan is None:
        raise IngestError(f"{out}: no ingest plan found; run the ingest first")
    missing = [b for b in range(plan["n_blocks"]) if not block_done(out, b)]
    if missing:
        raise IngestError(
            f"{out}: {len(missing)} blocks not written yet (e.g. {missing[:5]}); "
            "rerun ingest with --resume"
        )
    digest = _write_side(out, plan)
    vocab = _copy_vocab(out)
    vocab.save(out / "genes.tsv")
    save_labels(out / "labels.json", {c: plan["labels"][c] for c in plan["conditions"]})
    digest.update(vocab.fingerprint().encode())
    digest.update(json.dumps(plan, sort_keys=True).encode())
    manifest = _manifest(plan, vocab.fingerprint(), digest.hexdigest())
    # Records of every file but the row store, which is written after the manifest and adds its
    # own (copy_files.record_row_store). The fingerprint above does not depend on them.
    manifest["files"] = record_files(out, non_row_files(out))
    manifest["file_sample"] = sampling_recipe()
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    # Only now is the spill redundant; two workers may finalize at once, hence ignore_errors.
    shutil.rmtree(spill_dir(out), ignore_errors=True)
    logger.info("training copy complete: %s (%d cells)", out, plan["n_cells"])
    return manifest


def _write_side(out: Path, plan: dict) -> Any:
    """Concatenate per-block side values into side/*.npy (memory-mapped, block by block).

    Returns:
        A sha256 object updated with every side value in copy order.
    """
    side, digest = out / "side", hashlib.sha256()
    names = ["library_size", "nnz", "source_joinid", *[f"codes_{c}" for c in plan["conditions"]]]
    side.mkdir(exist_ok=True)
    # Unique temporary names: two workers may finalize at once; os.replace keeps it atomic.
    tmp_paths = {k: side / f".{k}.{os.getpid()}.npy" for k in names}
    arrays: dict[str, np.ndarray] = {}
    for b in range(plan["n_blocks"]):
        lo, hi = block_range(plan, b)
        with np.load(progress_dir(out) / f"block_{b:06d}.npz") as part:
            for k in names:
                if k not in arrays:
                    arrays[k] = np.lib.format.open_memmap(
                        tmp_paths[k], mode="w+", dtype=part[k].dtype, shape=(plan["n_cells"],)
                    )
                arrays[k][lo:hi] = part[k]
                digest.update(part[k].tobytes())
    for k in names:
        arrays[k].flush()
        del arrays[k]
        os.replace(tmp_paths[k], side / f"{k}.npy")
    return digest


def _manifest(plan: dict, gene_fingerprint: str, fingerprint: str) -> dict:
    """manifest.json content (contracts.md §1)."""
    opts = plan["options"]
    return {
        "format_version": FORMAT_VERSION,
        "n_cells": plan["n_cells"],
        "n_genes": plan["n_genes"],
        "seed": opts["seed"],
        "permutation": PERMUTATION_RECIPE,
        "source": plan["source"],
        "obs_filter": opts["obs_filter"],
        "obs_columns": [c["name"] for c in plan["obs_columns"]],
        "filled_obs_columns": [c["name"] for c in plan["obs_columns"] if "fill" in c],
        "condition_columns": plan["conditions"],
        "round_counts": opts["round_counts"],
        "block_cells": opts["block_cells"],
        "x_tiling": {
            "cell_tile": opts["cell_tile"],
            "gene_tile": plan["n_genes"],
            "capacity": 131072,
            "compression": "zstd-3+byteshuffle",
        },
        "gene_fingerprint": gene_fingerprint,
        "fingerprint": fingerprint,
    }


def _copy_vocab(out: Path) -> GeneVocab:
    """Gene vocabulary from the copy's var (token = soma_joinid + 1)."""
    with tiledbsoma.Experiment.open(str(out / "experiment")) as exp:
        var = soma.var_table(exp)
    return GeneVocab(var.column("feature_id").to_pylist(), var.column("feature_name").to_pylist())


def open_copy_manifest(path: str | os.PathLike) -> dict:
    """Manifest of a complete training copy; raises IngestError if the copy is incomplete."""
    path = Path(path)
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise IngestError(
            f"{path} is not a complete training copy: manifest.json is missing (the ingest failed "
            "or is still running); rerun ingest with --resume"
        )
    try:
        data = json.loads(manifest.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise damaged(path, f"manifest.json is truncated or not JSON ({err})") from None
    if not isinstance(data, dict):
        raise damaged(path, "manifest.json does not hold a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        raise IngestError(
            f"{path}: training copy format_version {data.get('format_version')} is not "
            f"{FORMAT_VERSION}; rebuild the copy with this version's ingest"
        )
    return data

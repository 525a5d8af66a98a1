"""Cell sources of the stream: a training copy (contracts.md §1) or a direct SOMA query.

(Direct mode over an h5ad file is data/h5ad_source.py.)

A training copy is a folder on a POSIX filesystem; direct mode reads any SOMA experiment, on a
path, at a URI (`s3://`) or in the CELLxGENE Census (`census[:VERSION]`, resolved to its URI
with cellxgene_census). Its vocabulary (`vocab_path`) is a genes.tsv or a plain gene list.

A source fixes the candidate cells once (sorted joinids after `obs_filter` and `min_genes`),
exposes per-cell metadata aligned with them, and reads sorted joinid lists into CSR pieces whose
gene ids are already vocabulary tokens. Reads run on reader threads; each thread opens its own
handle on the stream's single TileDB context.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import tiledbsoma

from atlasldm.data.config import DataConfig, is_h5ad
from atlasldm.data.csr import csr_from_sorted_coo
from atlasldm.data.h5ad_source import H5adSource
from atlasldm.data.materialize import open_copy_manifest
from atlasldm.data.npy_reads import NpyFile
from atlasldm.data.obs_codes import ObsColumns, hashes_of, read_obs
from atlasldm.data.obs_select import ObsFold, fold_obs, joinid_dtype
from atlasldm.data.piece import Piece, direct_keep, direct_piece, selection_mask, source_tokens
from atlasldm.data.rowstore import RowStore, has_row_store
from atlasldm.data.soma import (
    is_census,
    local_rows,
    obs_domain,
    obs_ranges,
    open_experiment,
    read_rows,
    stream_context,
)
from atlasldm.data.source_check import census_uri, check_copy_location
from atlasldm.data.split import hash_coded_strings, hash_int_keys
from atlasldm.data.verify import check_at_open, rows_in_use
from atlasldm.data.vocab import GeneVocab, load_labels

log = logging.getLogger(__name__)


SELECT_BLOCK = 1 << 20  # candidates per block of the selection


class _Source:
    """Shared parts: candidate joinids, aligned metadata, thread-local X handles."""

    def __init__(self, cfg: DataConfig, context: tiledbsoma.SOMATileDBContext, uri: str):
        self.cfg, self.context, self.uri = cfg, context, uri
        self.condition_names = tuple(cfg.condition_columns)
        self._local = threading.local()
        self.joinids = np.zeros(0, dtype=np.int64)  # sorted candidates, set by subclasses

    def select(self, min_genes: int, split: str, key: str, seed: int, fraction: float) -> float:
        """Keep the candidates with >= `min_genes` genes in `split`; return their mean nnz.

        Works in blocks of SELECT_BLOCK candidates, so the temporaries (nnz, hashes) do not grow
        with the corpus. The mean is NaN when the source has no per-cell nnz.
        """
        keep = np.empty(len(self.joinids), dtype=bool)
        total, known = 0, False
        for lo in range(0, len(self.joinids), SELECT_BLOCK):
            hi = min(lo + SELECT_BLOCK, len(self.joinids))
            nnz = self._nnz_block(lo, hi)
            hashes = self._split_hash_block(key, lo, hi) if split != "all" else None
            mask = selection_mask(hi - lo, nnz, hashes, min_genes, split, seed, fraction)
            keep[lo:hi] = mask
            if nnz is not None:
                total, known = total + int(nnz[mask].sum()), True
        self.restrict(keep)
        return total / len(self.joinids) if known and len(self.joinids) else float("nan")

    def ids(self, positions: np.ndarray | slice) -> np.ndarray:
        """int64 joinids of selection positions (held compact, as uint32 where they fit)."""
        return self.joinids[positions].astype(np.int64)

    def _x(self) -> tiledbsoma.SparseNDArray:
        if getattr(self._local, "x", None) is None:
            exp = tiledbsoma.Experiment.open(self.uri, context=self.context)
            self._local.exp, self._local.x = exp, exp.ms[self.cfg.measurement].X[self.cfg.layer]
        return self._local.x

    def _check_obs_columns(self, obs: tiledbsoma.DataFrame, columns: list[str]) -> None:
        names = set(obs.schema.names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise KeyError(f"obs of {self.uri} has no column(s) {missing}; have {sorted(names)}")

    def _read_obs(self, columns: list[str]) -> ObsColumns:
        """The filtered obs as compact arrays, read range by range (memory ~12 B per cell)."""
        with tiledbsoma.Experiment.open(self.uri, context=self.context) as exp:
            self._check_obs_columns(exp.obs, columns)
            ranges = self._obs_ranges(exp.obs, ["soma_joinid", *columns])
            return read_obs(ranges, columns, with_nnz=False)

    def _query_joinids(self) -> np.ndarray:
        """Ascending joinids (uint32 where they fit) of the cells that obs_filter keeps."""
        with tiledbsoma.Experiment.open(self.uri, context=self.context) as exp:
            lo, hi = obs_domain(exp.obs)
            fold = ObsFold(hi - lo + 1, hi + 1, [], None)
            ranges = self._obs_ranges(exp.obs, ["soma_joinid"])
            return fold_obs(ranges, fold, lambda ids, *_: np.ones(len(ids), bool), None).joinids

    def _obs_ranges(self, obs: tiledbsoma.DataFrame, columns: list[str]) -> Iterator[pa.Table]:
        """The obs of the cells obs_filter keeps, read in bounded joinid ranges, ascending."""
        return obs_ranges(obs, columns, self.cfg.obs_filter or None)


class CopySource(_Source):
    """A training copy: X rows are contiguous joinids; metadata come from memory-mapped side/."""

    def __init__(self, cfg: DataConfig, context: tiledbsoma.SOMATileDBContext):
        check_copy_location(cfg.source)  # a URI or the Census: one line, not a path error
        root = Path(cfg.source)
        self.manifest = open_copy_manifest(root)  # refuses a folder without manifest.json
        # Sizes and sampled checksums of the files it will read: damage is named, not streamed.
        check_at_open(root, self.manifest, rows_in_use(root, self.manifest, cfg.row_store))
        super().__init__(cfg, context, str(root / "experiment"))
        side = root / "side"
        self.labels = load_labels(root / "labels.json")
        self.vocab_size = len(GeneVocab.load(root / "genes.tsv"))
        self._side_files: dict[Path, NpyFile] = {}  # opened by the selection, closed after it
        self._obs_split: np.ndarray | None = None  # split hashes read from obs (rare key)
        self._library = NpyFile(side / "library_size.npy")
        self._nnz = NpyFile(side / "nnz.npy")
        self._codes = [self._side_codes(side, c) for c in self.condition_names]
        n_cells = int(self.manifest["n_cells"])
        if cfg.obs_filter:
            self.joinids = self._query_joinids()
        else:  # uint32 where the joinids fit: 4 B per cell held for the whole run
            self.joinids = np.arange(n_cells, dtype=joinid_dtype(n_cells))
        self.dropped_genes = 0
        self._rows = self._row_store(root)

    @property
    def reads_tiledb(self) -> bool:
        """True when X is read through TileDB (no usable row store)."""
        return self._rows is None

    def _row_store(self, root: Path) -> RowStore | None:
        """The copy's row store when present, enabled and of this copy; else None (TileDB)."""
        if self.cfg.row_store == "off" or not has_row_store(root):
            return None
        rows = RowStore(root)
        if rows.meta.get("copy_fingerprint") != self.manifest.get("fingerprint", ""):
            log.warning("%s/rows belongs to another copy; reading X through TileDB", root)
            return None
        return rows

    def _side_codes(self, side: Path, column: str) -> np.ndarray:
        path = side / f"codes_{column}.npy"
        if not path.is_file() or column not in self.labels:
            have = sorted(p.stem.removeprefix("codes_") for p in side.glob("codes_*.npy"))
            raise KeyError(
                f"condition column {column!r} is not in this training copy (have {have}); "
                "rematerialize with it or remove it from condition_columns"
            )
        return NpyFile(path)

    def fingerprint_parts(self) -> dict:
        """Identity of the data: the copy's own fingerprint."""
        return {"copy": self.manifest.get("fingerprint", ""), "n_cells": self.manifest["n_cells"]}

    def _nnz_block(self, lo: int, hi: int) -> np.ndarray:
        return self._nnz.take(self.joinids[lo:hi])

    def _side_file(self, path: Path) -> NpyFile:
        """An open side array, kept for the selection's blocks (one descriptor per file)."""
        if path not in self._side_files:
            self._side_files[path] = NpyFile(path)
        return self._side_files[path]

    def _split_hash_block(self, key: str, lo: int, hi: int) -> np.ndarray:
        """uint64 hash of the split key of candidates lo..hi (source joinid for soma_joinid)."""
        ids, side = self.joinids[lo:hi], Path(self.cfg.source) / "side"
        if key == "soma_joinid":
            return hash_int_keys(self._side_file(side / "source_joinid.npy").take(ids))
        path = side / f"codes_{key}.npy"
        if path.is_file() and key in self.labels:
            return hash_coded_strings(self._side_file(path).take(ids), self.labels[key])
        if self._obs_split is None:  # not in side/: read obs once
            self._obs_split = hashes_of(self._read_obs([key]).coded[key])
        return self._obs_split[lo:hi]

    def restrict(self, mask: np.ndarray) -> None:
        """Keep only the candidates where `mask` is True."""
        self.joinids, self._obs_split = self.joinids[mask], None
        for npy in self._side_files.values():
            npy.close()
        self._side_files = {}

    def read_piece(self, joinids: np.ndarray) -> Piece:
        """Read sorted joinids from the row store, else through TileDB (`read_rows`)."""
        if self._rows is not None:
            return Piece(joinids, self._rows.read(joinids), None, 0)
        dim0, dim1, data = read_rows(self._x(), joinids)
        tokens = dim1.astype(np.int32)
        tokens += 1  # copy var soma_joinid g is token g + 1
        csr = csr_from_sorted_coo(local_rows(dim0, joinids), len(joinids), tokens, data)
        return Piece(joinids, csr, None, 0)

    def cell_meta(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (library_size float32 (n,), conditions int64 (n, A)) of selection positions."""
        ids = self.joinids[positions]
        cond = np.zeros((len(ids), len(self._codes)), dtype=np.int64)
        for a, codes in enumerate(self._codes):
            cond[:, a] = codes.take(ids)
        return self._library.take(ids).astype(np.float32), cond


class DirectSource(_Source):
    """Any SOMA experiment: cells from a value_filter, genes mapped by var feature_id."""

    def __init__(self, cfg: DataConfig, context: tiledbsoma.SOMATileDBContext):
        if not cfg.vocab_path:
            raise ValueError(
                "direct mode needs vocab_path: a genes.tsv or a list of gene ids (the tokens)"
            )
        uri = cfg.source
        if is_census(cfg.source):  # the Census's experiment URI and the S3 settings to read it
            uri, s3 = census_uri(cfg.source)
            context = stream_context({**s3, **cfg.tiledb_config})
        super().__init__(cfg, context, uri)
        vocab = GeneVocab.read(cfg.vocab_path)
        self.vocab_size, self.vocab_fingerprint = len(vocab), vocab.fingerprint()
        with open_experiment(self.uri, context) as exp:  # names the URI if it cannot
            var = exp.ms[cfg.measurement].var.read(column_names=["soma_joinid", "feature_id"])
            var = var.concat()
            has_nnz = "nnz" in exp.obs.schema.names
        tokens, self.dropped_genes = source_tokens(
            vocab, var["feature_id"].to_pylist(), cfg.unknown_genes, self.uri
        )
        var_ids = var["soma_joinid"].to_numpy()
        self.var_tokens = np.zeros(int(var_ids.max()) + 1 if len(var_ids) else 0, dtype=np.int32)
        self.var_tokens[var_ids] = tokens
        self._has_nnz = has_nnz
        self.labels: dict[str, list] = {}  # set by select
        self._cond = np.zeros((0, len(self.condition_names)), dtype=np.int16)

    reads_tiledb = True  # X always comes through TileDB

    def fingerprint_parts(self) -> dict:
        """Identity of the data: URI, query, vocabulary and labels."""
        return {
            "uri": self.uri,
            "obs_filter": self.cfg.obs_filter,
            "vocab": self.vocab_fingerprint,
            "unknown_genes": self.cfg.unknown_genes,
            "labels": self.labels,
        }

    def select(self, min_genes: int, split: str, key: str, seed: int, fraction: float) -> float:
        """Read the query's obs range by range, keeping only the selected cells; mean nnz.

        obs nnz counts all measured genes, not only vocabulary genes (documented deviation).
        Labels come from every cell of the query (before min_genes and the split), so the train
        and validation streams of one query share them.
        """
        keep = direct_keep(min_genes, split, seed, fraction)
        split_column = None if key == "soma_joinid" or split == "all" else key
        with tiledbsoma.Experiment.open(self.uri, context=self.context) as exp:
            columns = [*self.condition_names, *([split_column] if split_column else [])]
            self._check_obs_columns(exp.obs, columns)
            lo, hi = obs_domain(exp.obs)
            fold = ObsFold(hi - lo + 1, hi + 1, list(self.condition_names), split_column)
            names = ["soma_joinid", *dict.fromkeys(columns), *(["nnz"] if self._has_nnz else [])]
            given = load_labels(self.cfg.labels_path) if self.cfg.labels_path else None
            selected = fold_obs(self._obs_ranges(exp.obs, names), fold, keep, given)
        self.joinids, self._cond, self.labels = selected.joinids, selected.codes, selected.labels
        known = selected.nnz_known and len(self.joinids)
        return selected.nnz_sum / len(self.joinids) if known else float("nan")

    def read_piece(self, joinids: np.ndarray) -> Piece:
        """Read sorted joinids over all genes; library size before vocabulary mapping."""
        dim0, dim1, data = read_rows(self._x(), joinids)
        # Genes outside the vocabulary get token 0: they count in the library size, then go.
        tokens = self.var_tokens[dim1]
        return direct_piece(
            joinids, csr_from_sorted_coo(local_rows(dim0, joinids), len(joinids), tokens, data)
        )

    def cell_meta(self, positions: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Return (None: library size comes from the read, conditions int64 (n, A))."""
        return None, self._cond[positions].astype(np.int64)


def open_source(cfg: DataConfig, context: tiledbsoma.SOMATileDBContext):
    """Return the source for `cfg.mode`: a copy, an h5ad file or a SOMA experiment."""
    if not cfg.source:
        raise ValueError("DataConfig.source is empty; pass a training-copy folder or SOMA URI")
    if cfg.mode == "copy":
        return CopySource(cfg, context)
    return H5adSource(cfg) if is_h5ad(cfg.source) else DirectSource(cfg, context)

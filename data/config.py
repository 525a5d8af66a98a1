"""DataConfig: the typed schema of the streaming loader (loaded by `train.config.load_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Chunk sizes when `chunk_cells` is 0. A training copy is pre-shuffled with cell tiles of 256
# rows. A Census-layout experiment is grouped by dataset in tiles of 2,048 rows: a 512-row chunk
# is read as one slice, far cheaper per cell than short chunks (each decodes a whole tile for a
# few rows), and the stratified chunk order (sampler.py) keeps batches diverse by spreading each
# round over the whole selection.
DEFAULT_CHUNK_CELLS = {"copy": 256, "direct": 512}
# An uncompressed h5ad has no tiles: a short chunk costs two positional reads, not a tile decode,
# so direct mode over an h5ad file reads 64-row chunks, which mix datasets like random cells.
H5AD_CHUNK_CELLS = 64


def is_h5ad(source: str) -> bool:
    """True when a direct-mode source names an h5ad file (read by data/h5ad_source.py)."""
    return source.endswith(".h5ad")


@dataclass
class DataConfig:
    """Streaming loader settings; every field is documented inline with its meaning and unit."""

    # training-copy folder on a POSIX filesystem (mode=copy), or a SOMA experiment path or URI
    # (s3://...) or census[:VERSION] (CELLxGENE Census, homo_sapiens; needs network) (mode=direct)
    source: str = ""
    mode: Literal["copy", "direct"] = "copy"  # read a training copy or query any experiment
    row_store: Literal["auto", "off"] = "auto"  # copy mode: read X from <copy>/rows if present
    measurement: str = "RNA"  # SOMA measurement name holding X and var (direct mode)
    layer: str = "raw"  # X layer with raw counts (float32, no explicit zeros)
    obs_filter: str = ""  # SOMA value_filter on obs, applied once at selection ("" = all cells)
    vocab_path: str = ""  # direct mode: genes.tsv or one gene id per line ("" = copy's genes)
    labels_path: str = ""  # labels.json for direct mode ("" = sorted values of the selection)
    condition_columns: list[str] = field(default_factory=list)  # obs columns -> conditions (B, A)
    micro_batch: int = 256  # cells per emitted batch per rank
    chunk_cells: int = 0  # C, consecutive selected cells per shuffle chunk (0 = mode default)
    chunks_per_rank_round: int = 0  # K, chunks per rank per IO round (0 = from memory budget)
    memory_budget_gb: float = 4.0  # host memory the loader may use per rank, GB (10^9 bytes)
    reader_threads: int = 2  # reader threads per rank (0 = synchronous in the caller)
    prefetch_rounds: int = 1  # IO rounds read ahead of the one being emitted
    seed: int = 0  # seeds the shuffle, the split and the max_genes subsample
    max_genes: int = 8192  # expressed genes kept per cell; larger cells get a fixed subsample
    min_genes: int = 1  # cells with fewer expressed genes are excluded once at selection
    unknown_genes: Literal["error", "drop"] = "error"  # direct mode: source genes not in vocab
    val_fraction: float = 0.0  # share of cells (or donors/datasets) in the validation split
    split_key: Literal["soma_joinid", "donor_id", "dataset_id"] = "soma_joinid"  # split unit
    elastic: Literal["restart_round", "skip_round"] = "restart_round"  # resume with a new W
    drop_last: bool = False  # True: fixed batch size, drop < W*micro_batch cells per epoch
    tiledb_config: dict[str, str] = field(default_factory=dict)  # extra TileDB settings (S3)
    # False: clear TileDB's statistics every round (kept per query even with statistics off,
    # they grew a rank by ~10 MB per 1,000 batches); True keeps them for tiledbsoma_stats_dump
    keep_tiledb_stats: bool = False

    def __post_init__(self) -> None:
        """Check cross-field constraints; messages name the field and the fix."""
        checks = [
            (self.micro_batch >= 1, f"micro_batch={self.micro_batch} must be >= 1"),
            (self.chunk_cells >= 0, f"chunk_cells={self.chunk_cells} must be >= 0 (0 = default)"),
            (
                self.chunks_per_rank_round >= 0,
                f"chunks_per_rank_round={self.chunks_per_rank_round} must be >= 0 (0 = derive)",
            ),
            (self.memory_budget_gb > 0, "memory_budget_gb must be > 0"),
            (self.reader_threads >= 0, "reader_threads must be >= 0 (0 = synchronous)"),
            (self.prefetch_rounds >= 0, "prefetch_rounds must be >= 0"),
            (self.seed >= 0, f"seed={self.seed} must be >= 0"),
            (self.max_genes >= 1, f"max_genes={self.max_genes} must be >= 1"),
            (self.min_genes >= 0, f"min_genes={self.min_genes} must be >= 0"),
            (
                self.min_genes <= self.max_genes,
                f"min_genes={self.min_genes} exceeds max_genes={self.max_genes}; lower min_genes",
            ),
            (
                0.0 <= self.val_fraction < 1.0,
                f"val_fraction={self.val_fraction} must be in [0, 1)",
            ),
            (
                self.mode == "direct" or not self.vocab_path,
                "vocab_path is only used in direct mode; a training copy has its own genes.tsv",
            ),
            (
                self.mode == "direct" or not self.labels_path,
                "labels_path is only used in direct mode; a training copy has labels.json",
            ),
            (
                len(set(self.condition_columns)) == len(self.condition_columns),
                f"condition_columns {list(self.condition_columns)} has duplicates",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DataConfig: {message}")
        chunk = self.effective_chunk_cells
        if self.chunks_per_rank_round and (self.chunks_per_rank_round * chunk) % self.micro_batch:
            raise ValueError(
                f"DataConfig: chunks_per_rank_round*chunk_cells = {self.chunks_per_rank_round}*"
                f"{chunk} is not a multiple of micro_batch={self.micro_batch}, so rows would carry "
                "over between rounds; change chunks_per_rank_round or set it to 0 to derive it"
            )

    @property
    def effective_chunk_cells(self) -> int:
        """C: `chunk_cells`, or the mode's default when it is 0."""
        if self.chunk_cells:
            return self.chunk_cells
        if self.mode == "direct" and is_h5ad(self.source):
            return H5AD_CHUNK_CELLS
        return DEFAULT_CHUNK_CELLS[self.mode]

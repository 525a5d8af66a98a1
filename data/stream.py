"""CellStream: the lockstep, exactly resumable stream of CsrBatch.

Design: docs/loader.md, "Goals" and "Positions, resume and elastic resume".

Usage per rank: `stream = CellStream(cfg, split="train", rank=r, world_size=W)`, then
`for epoch in ...: stream.set_epoch(epoch); for batch in stream: ...`. `state_dict()` is the
same on every rank, so it can live in DeepSpeed's rank-0 `client_state`.

Selection: candidates (obs_filter) minus cells with fewer than `min_genes` expressed genes
(filtered once from side/nnz.npy, or obs `nnz` in direct mode) minus the other split. The
selection is fixed at construction, so "every cell exactly once per epoch" is well defined.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import tiledbsoma
import torch

from atlasldm.data.batch import CsrBatch
from atlasldm.data.config import DataConfig
from atlasldm.data.heap import release_freed_heap
from atlasldm.data.pipeline import (
    Csr,
    Metrics,
    RoundPipeline,
    chunks_per_rank_from_budget,
    truncate_rows,
)
from atlasldm.data.reader import Piece, open_source
from atlasldm.data.sampler import LockstepSampler, Restart, RoundPlan, elastic_restart, eval_rounds
from atlasldm.data.split import Split

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # 2: rank-contiguous layout, per-epoch C, restarts (1: global rounds)
# Direct mode lowers the default chunk length until every rank reads at least this many chunks
# per epoch: a rank's batches can only mix as many datasets as its round has chunks, and its
# epoch mix is off by about one chunk per dataset boundary (see docs/loader.md, diversity).
MIN_RANK_CHUNKS = 256
# Per-query result buffers: tiledbsoma's 1 GiB default is allocated per read and per thread
# and made 256-row reads ~1.5x slower; larger results arrive in several tables anyway.
DEFAULT_TILEDB_CONFIG = {"soma.init_buffer_bytes": str(64 * 1024**2)}
# Direct mode reads chunks this long as one slice each; shorter ones go in one point query per
# job (Census layout, 2 cores: 64-row chunks 1.5x faster in one query, 1,024-row ones 1.2x
# faster as slices).
SLICE_READ_MIN_CELLS = 256
_ASSUMED_NNZ = 2000.0  # per cell, for the memory budget when obs has no nnz column
FINGERPRINT_BLOCK = 1 << 20  # joinids per hashed block: the int64 view costs 8 MB, not 8 B/cell


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Return (rank, world size) from the arguments, else from RANK / WORLD_SIZE.

    LOCAL_RANK is never used: it repeats on every node, so it would duplicate shards.
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if rank is None:
        if "RANK" in os.environ:
            rank = int(os.environ["RANK"])
        elif world_size > 1:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but RANK is not set; pass rank= explicitly or launch "
                "with torchrun/deepspeed (LOCAL_RANK is per node and is never used as the rank)"
            )
        else:
            rank = 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    return rank, world_size


def _cat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def auto_chunk_cells(config: DataConfig, num_cells: int, world_size: int) -> int:
    """Return C: the configured or default chunk length, lowered in direct mode for small N/W.

    Only a fully derived direct-mode layout adapts (chunk_cells = chunks_per_rank_round = 0):
    the default halves until each rank gets MIN_RANK_CHUNKS chunks per epoch. A training copy
    is pre-shuffled, so its chunks are random cells and their length does not matter for mixing.
    """
    C = config.effective_chunk_cells
    if config.mode != "direct" or config.chunk_cells or config.chunks_per_rank_round:
        return C
    while C > 1 and num_cells // C // world_size < MIN_RANK_CHUNKS:
        C //= 2
    return C


def stream_layout(
    config: DataConfig,
    num_cells: int,
    world_size: int,
    mean_nnz: float,
    chunk_cells: int | None = None,
) -> tuple[int, int]:
    """Return (C, K), the chunk length and chunks per rank round, the stream uses for a shape.

    `chunk_cells` forces C (a resumed epoch keeps the C it started with).
    """
    C = chunk_cells or auto_chunk_cells(config, num_cells, world_size)
    K = config.chunks_per_rank_round
    if not K or (K * C) % config.micro_batch:
        K = chunks_per_rank_from_budget(
            mean_nnz, C, config.micro_batch, config.memory_budget_gb, config.prefetch_rounds,
            max_chunks=num_cells // C // world_size,
        )  # fmt: skip
    return C, K


@dataclass
class PreparedRound:
    """One rank's round, read; its batches are copied out of the read pieces one by one.

    The pieces are never concatenated: a round-sized copy is a fresh allocation above glibc's
    mmap threshold, and its first-touch page faults cost ~1 s per 350 MB round on this machine.
    """

    plan: RoundPlan
    pieces: list[Piece]  # ascending joinids
    piece: np.ndarray  # int64 (n,), piece of each emitted row
    starts: np.ndarray  # int64 (n,), entry offset of each emitted row in its piece
    lengths: np.ndarray  # int64 (n,), expressed genes of each emitted row
    library: np.ndarray  # float32 (n,), emission order
    conditions: np.ndarray  # int64 (n, A), emission order
    joinids: np.ndarray  # int64 (n,), emission order
    bounds: np.ndarray  # int64 (n_batches + 1,), batch b is rows bounds[b]:bounds[b + 1]

    def __len__(self) -> int:
        return len(self.bounds) - 1


class CellStream(torch.utils.data.IterableDataset):
    """Iterable of CsrBatch for one rank; every rank yields `len(stream)` batches per epoch."""

    def __init__(
        self,
        config: DataConfig,
        split: Split = "train",
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.config, self.split = config, split
        self.rank, self.world_size = resolve_rank(rank, world_size)
        # One TileDB context per stream, shared by all reader threads.
        tiledb_config = {**DEFAULT_TILEDB_CONFIG, **config.tiledb_config}
        self.context = tiledbsoma.SOMATileDBContext(tiledb_config=tiledb_config)
        self.source = open_source(config, self.context)
        mean_nnz = self._select()
        release_freed_heap()  # the selection's temporaries would otherwise stay resident
        self._mean_nnz = mean_nnz if np.isfinite(mean_nnz) else _ASSUMED_NNZ
        self._samplers: dict[int, LockstepSampler] = {}
        self._natural_C = stream_layout(config, self.num_cells, self.world_size, self._mean_nnz)[0]
        self._epoch, self._C, self._restarts, self._batch = 0, self._natural_C, (), 0
        C, K = self.sampler.chunk_cells, self.sampler.chunks_per_rank
        self.fingerprint = self._fingerprint()
        self._metrics = Metrics(
            chunk_cells=C, chunks_per_rank_round=K, prefetch_rounds=config.prefetch_rounds,
            reader_threads=config.reader_threads, selected_cells=self.num_cells,
            dropped_unknown_genes=self.source.dropped_genes, replayed_cells=0, skipped_cells=0,
        )  # fmt: skip
        self._pipeline = RoundPipeline(config.reader_threads, config.prefetch_rounds)
        log.info(
            "stream rank %d/%d: %d cells (%s), C=%d K=%d prefetch=%d threads=%d, mean nnz %.0f, "
            "%d batches/epoch", self.rank, self.world_size, self.num_cells, split, C, K,
            config.prefetch_rounds, config.reader_threads, self._mean_nnz, len(self),
        )  # fmt: skip

    @property
    def sampler(self) -> LockstepSampler:
        """The sampler of the current epoch (its C is the natural one except in a resumed epoch)."""
        return self._sampler_for(self._C)

    def _sampler_for(self, C: int) -> LockstepSampler:
        if C not in self._samplers:
            cfg = self.config
            _, K = stream_layout(cfg, self.num_cells, self.world_size, self._mean_nnz, C)
            self._samplers[C] = LockstepSampler(
                self.num_cells, C, K, cfg.micro_batch, self.world_size, self.rank, cfg.seed,
                cfg.drop_last,
            )  # fmt: skip
        return self._samplers[C]

    def _move_to_epoch(self, epoch: int) -> None:
        self._epoch, self._C, self._restarts, self._batch = epoch, self._natural_C, (), 0

    @property
    def num_cells(self) -> int:
        """Number of selected cells N (all ranks together)."""
        return len(self.source.joinids)

    def _select(self) -> float:
        """Fix the selection; return its mean nnz (NaN when the source has none)."""
        cfg = self.config
        mean_nnz = self.source.select(
            cfg.min_genes, self.split, cfg.split_key, cfg.seed, cfg.val_fraction
        )
        if self.num_cells == 0:
            raise ValueError(
                f"no cells selected from {cfg.source} (split={self.split!r}, "
                f"val_fraction={cfg.val_fraction}, min_genes={cfg.min_genes}, "
                f"obs_filter={cfg.obs_filter!r}); loosen the filter or the split"
            )
        return mean_nnz

    def _fingerprint(self) -> str:
        cfg = self.config
        recipe = {
            **self.source.fingerprint_parts(),
            "split": self.split, "val_fraction": cfg.val_fraction, "split_key": cfg.split_key,
            "obs_filter": cfg.obs_filter, "C": cfg.effective_chunk_cells,
            "min_genes": cfg.min_genes, "max_genes": cfg.max_genes,
            "conditions": list(cfg.condition_columns),
        }  # fmt: skip
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
        ids = self.source.joinids  # hashed as int64, in blocks, whatever dtype holds them
        for lo in range(0, len(ids), FINGERPRINT_BLOCK):
            digest.update(memoryview(self.source.ids(slice(lo, lo + FINGERPRINT_BLOCK))))
        return digest.hexdigest()

    def __len__(self) -> int:
        """Batches per epoch per rank (identical on every rank), of the current epoch's layout."""
        return self.sampler.num_batches(self._restarts)

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch`; a no-op when already in it (keeps a resumed position)."""
        if epoch != self._epoch:
            self._move_to_epoch(epoch)

    def __iter__(self) -> Iterator[CsrBatch]:
        """Yield this rank's remaining batches of the current epoch, then advance the epoch."""
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                "CellStream runs its own reader threads; every DataLoader worker process would "
                "repeat the same batches. Use DataLoader(stream, batch_size=None, num_workers=0)"
            )
        epoch, restarts, first = self._epoch, self._restarts, self._batch
        plans = (
            p.without_first(first - p.first_batch)
            for p in self.sampler.rounds(epoch, restarts, first)
            if p.first_batch + len(p.batch_sizes) > first
        )
        for prepared in self._pipeline.map_rounds(plans, self._jobs, self._prepare):
            self._clear_tiledb_stats()
            batches = self._pipeline.lookahead(partial(self._gather_batch, prepared), len(prepared))
            for i, batch in enumerate(batches):
                self._batch = prepared.plan.first_batch + i + 1
                self._metrics.add(cells=batch.num_cells, nnz=batch.num_tokens, batches=1)
                yield batch
        if (self._epoch, self._restarts) == (epoch, restarts):
            self._move_to_epoch(epoch + 1)

    def iter_eval(self) -> Iterator[CsrBatch]:
        """Yield every selected cell once, unshuffled; ranks disjoint with equal batch counts."""
        rows_per_round = self.sampler.chunks_per_rank * self.sampler.chunk_cells
        plans = eval_rounds(
            self.num_cells, self.world_size, self.rank, self.config.micro_batch, rows_per_round
        )
        for prepared in self._pipeline.map_rounds(plans, self._jobs, self._prepare):
            self._clear_tiledb_stats()
            gather = partial(self._gather_batch, prepared)
            yield from self._pipeline.lookahead(gather, len(prepared))

    def _clear_tiledb_stats(self) -> None:
        """Drop TileDB's per-query statistics, which it keeps even with statistics disabled.

        Without this a direct-mode rank grew by ~10 MB per 1,000 batches (measured at 500k and
        5M cells), so its memory depended on how far into the run it was. The reset is
        process-wide and clears statistics a user enabled: `keep_tiledb_stats=True` keeps them.
        """
        if self.source.reads_tiledb and not self.config.keep_tiledb_stats:
            tiledbsoma.tiledbsoma_stats_reset()

    def _jobs(self, plan: RoundPlan) -> list[Callable[[], Piece]]:
        """Split the round's rows into read jobs of sorted, contiguous selection runs."""
        positions = np.unique(plan.rows)
        if len(positions) == 0:
            return []
        # A run may skip a few rows (a resumed round's consumed ones): one slice read beats
        # many small ones, and the reader drops rows it was not asked for.
        runs = np.split(
            positions, np.flatnonzero(np.diff(positions) > self.sampler.chunk_cells) + 1
        )
        # >= 2 jobs per thread for balance; <= ~4k rows per job bounds the per-job arrays and
        # how long close() waits for a running job
        n_jobs = max(2 * self.config.reader_threads, -(-len(positions) // 4096), 1)
        starts = np.cumsum([0] + [len(r) for r in runs[:-1]])
        group = (starts * n_jobs) // len(positions)  # contiguous groups of ~equal rows
        return [
            partial(self._read, [runs[i] for i in np.flatnonzero(group == g)])
            for g in np.unique(group)
        ]

    def _read(self, runs: list[np.ndarray]) -> list[Piece]:
        t0 = time.perf_counter()
        if self.config.mode == "direct" and self.sampler.chunk_cells < SLICE_READ_MIN_CELLS:
            runs = [np.concatenate(runs)]  # one query for short runs: shared tiles read once
        pieces = [self.source.read_piece(self.source.ids(run)) for run in runs]
        self._metrics.add(read_s=time.perf_counter() - t0)
        return pieces

    def _prepare(self, plan: RoundPlan, groups: list[list[Piece]]) -> PreparedRound:
        """Locate each emitted row (plan order) in the round's pieces; no entry is copied."""
        t0 = time.perf_counter()
        pieces = [p for group in groups for p in group]
        sizes = [len(p.joinids) for p in pieces]
        piece = np.repeat(np.arange(len(pieces), dtype=np.int64), sizes)
        starts = _cat([p.csr.indptr[:-1] for p in pieces], np.int64)
        lengths = _cat([np.diff(p.csr.indptr) for p in pieces], np.int64)
        wanted = self.source.ids(plan.rows)  # emission order
        rows = np.searchsorted(_cat([p.joinids for p in pieces], np.int64), wanted)
        library, conditions = self.source.cell_meta(plan.rows)
        if library is None:
            library = _cat([p.library_size for p in pieces], np.float32)[rows]
        prepared = PreparedRound(
            plan, pieces, piece[rows], starts[rows], lengths[rows], library, conditions, wanted,
            np.concatenate([[0], np.cumsum(plan.batch_sizes)]),
        )  # fmt: skip
        self._metrics.add(
            assemble_s=time.perf_counter() - t0,
            dropped_unknown_nnz=sum(p.dropped_nnz for p in pieces),
        )
        return prepared

    def _gather_batch(self, prepared: PreparedRound, index: int) -> CsrBatch:
        """Copy batch `index` of a prepared round out of its pieces, row by row (memcpy each)."""
        t0 = time.perf_counter()
        s, e = prepared.bounds[index], prepared.bounds[index + 1]
        spans = list(
            zip(
                prepared.piece[s:e].tolist(),
                prepared.starts[s:e].tolist(),
                (prepared.starts[s:e] + prepared.lengths[s:e]).tolist(),
                strict=True,
            )
        )
        csrs = [p.csr for p in prepared.pieces]
        indices = _cat([csrs[j].indices[a:b] for j, a, b in spans], np.int32)
        data = _cat([csrs[j].data[a:b] for j, a, b in spans], np.float32)
        indptr = np.zeros(e - s + 1, dtype=np.int64)
        np.cumsum(prepared.lengths[s:e], out=indptr[1:])
        joinids = prepared.joinids[s:e]
        csr, cut = truncate_rows(
            Csr(indptr, indices, data), joinids, self.config.max_genes, self.config.seed
        )
        batch = CsrBatch.from_numpy(
            csr.indices, csr.data, csr.indptr, prepared.library[s:e], prepared.conditions[s:e],
            self.source.condition_names, joinids,
        )  # fmt: skip
        self._metrics.add(assemble_s=time.perf_counter() - t0, truncated_cells=int(cut.sum()))
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Return the position; identical on every rank (safe for rank-0 client_state)."""
        s = self.sampler
        round_index, micro = s.locate(self._restarts, self._batch)
        restarts = [[r.world_size, r.chunks_per_rank, r.round, r.skip] for r in self._restarts]
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "seed": self.config.seed,
            "epoch": self._epoch,
            "C": s.chunk_cells,
            "restarts": restarts,
            "batch_in_epoch": self._batch,
            "round": round_index,
            "microbatch_in_round": micro,
            "world_size": s.world_size,
            "K": s.chunks_per_rank,
            "micro_batch": s.micro_batch,
            "drop_last": s.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Seek to a saved position (O(1)); with another W/K/b, restart the interrupted round.

        The saved epoch finishes with the C it started with; the next epoch uses this layout's.
        """
        self._check_state(state)
        if state["format_version"] == 1:
            self._load_v1(state)
            return
        restarts = tuple(Restart(*r) for r in state["restarts"])
        self._epoch, self._C, self._restarts, self._batch = (
            state["epoch"], state["C"], restarts, state["batch_in_epoch"],
        )  # fmt: skip
        s = self.sampler
        saved = (state["world_size"], state["K"], state["micro_batch"], state["drop_last"])
        if saved == (s.world_size, s.chunks_per_rank, s.micro_batch, s.drop_last):
            return
        old = LockstepSampler(
            self.num_cells, state["C"], state["K"], state["micro_batch"], state["world_size"], 0,
            state["seed"], state["drop_last"],
        )  # fmt: skip
        moved = elastic_restart(old, restarts, state["batch_in_epoch"], self.config.elastic)
        if moved.restarts is None:
            self._move_to_epoch(state["epoch"] + 1)
        else:
            self._restarts, self._batch = moved.restarts, 0
        self._metrics.add(replayed_cells=moved.replayed_cells, skipped_cells=moved.skipped_cells)
        log.warning(
            "elastic resume W=%d K=%d -> W=%d K=%d (%s): epoch %d, segment %d, "
            "%d cells replayed, %d skipped", state["world_size"], state["K"], s.world_size,
            s.chunks_per_rank, self.config.elastic, self._epoch, len(self._restarts),
            moved.replayed_cells, moved.skipped_cells,
        )  # fmt: skip

    def _load_v1(self, state: dict[str, Any]) -> None:
        """A position of the old global-round layout: replay its epoch from the start.

        Its rounds are not this layout's, so the consumed cells cannot be mapped; replaying
        the epoch loses no cell (each of its cells is seen at least once in that epoch).
        """
        mid_epoch = state["batch_in_epoch"] > 0 or state.get("start_chunk", 0) > 0
        self._move_to_epoch(state["epoch"])
        if mid_epoch:
            log.warning(
                "loader state format 1 (global-round layout) at epoch %d batch %d: replaying "
                "that epoch from its start under the rank-contiguous layout",
                state["epoch"], state["batch_in_epoch"],
            )  # fmt: skip

    def _check_state(self, state: dict[str, Any]) -> None:
        if state.get("format_version") not in (1, FORMAT_VERSION):
            raise ValueError(
                f"loader state format_version={state.get('format_version')} is not "
                f"{FORMAT_VERSION}; this checkpoint was written by another loader version"
            )
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"loader state belongs to other data (fingerprint {state['fingerprint'][:12]} != "
                f"{self.fingerprint[:12]}): the copy, query, split, min/max_genes or chunk_cells "
                "changed; resume with the original data config or start a new run"
            )
        if state["seed"] != self.config.seed:
            raise ValueError(
                f"loader state has seed={state['seed']} but the config has "
                f"seed={self.config.seed}; restore the original value"
            )

    def metrics(self) -> dict[str, Any]:
        """Return counters: cells, nnz, batches, read_s, assemble_s, truncated/dropped/replayed."""
        return self._metrics.snapshot()

    def close(self) -> None:
        """Stop reader threads."""
        self._pipeline.close()

"""CellStream: the lockstep, exactly resumable stream of CsrBatch (loader.md §3).

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

from data.batch import CsrBatch
from data.config import DataConfig
from data.pipeline import (
    Csr,
    Metrics,
    RoundPipeline,
    chunks_per_rank_from_budget,
    truncate_rows,
)
from data.reader import Piece, open_source
from data.sampler import LockstepSampler, RoundPlan, elastic_restart, eval_rounds
from data.split import Split, split_mask

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
# Per-query result buffers: tiledbsoma's 1 GiB default is allocated per read and per thread
# and made 256-row reads ~1.5x slower; larger results arrive in several tables anyway.
DEFAULT_TILEDB_CONFIG = {"soma.init_buffer_bytes": str(64 * 1024**2)}
# Direct mode reads chunks this long as one slice each; shorter ones go in one point query per
# job (Census layout, 2 cores: 64-row chunks 1.5x faster in one query, 1,024-row ones 1.2x
# faster as slices).
SLICE_READ_MIN_CELLS = 256
_ASSUMED_NNZ = 2000.0  # per cell, for the memory budget when obs has no nnz column


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


def stream_layout(
    config: DataConfig, num_cells: int, world_size: int, mean_nnz: float
) -> tuple[int, int]:
    """Return (C, K), the chunk length and chunks per rank round, the stream uses for a shape."""
    C = config.effective_chunk_cells
    K = config.chunks_per_rank_round or chunks_per_rank_from_budget(
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
        self._select()
        nnz = self.source.nnz
        mean_nnz = float(np.mean(nnz)) if nnz is not None and len(nnz) else _ASSUMED_NNZ
        C, K = stream_layout(config, self.num_cells, self.world_size, mean_nnz)
        self.sampler = LockstepSampler(
            self.num_cells, C, K, config.micro_batch, self.world_size, self.rank, config.seed,
            config.drop_last,
        )  # fmt: skip
        self.fingerprint = self._fingerprint()
        self._metrics = Metrics(
            chunk_cells=C, chunks_per_rank_round=K, prefetch_rounds=config.prefetch_rounds,
            reader_threads=config.reader_threads, selected_cells=self.num_cells,
            dropped_unknown_genes=self.source.dropped_genes, replayed_cells=0, skipped_cells=0,
        )  # fmt: skip
        self._pipeline = RoundPipeline(config.reader_threads, config.prefetch_rounds)
        self._epoch = self._start = self._batch = 0
        log.info(
            "stream rank %d/%d: %d cells (%s), C=%d K=%d prefetch=%d threads=%d, mean nnz %.0f, "
            "%d batches/epoch", self.rank, self.world_size, self.num_cells, split, C, K,
            config.prefetch_rounds, config.reader_threads, mean_nnz, len(self),
        )  # fmt: skip

    @property
    def num_cells(self) -> int:
        """Number of selected cells N (all ranks together)."""
        return len(self.source.joinids)

    def _select(self) -> None:
        cfg, src = self.config, self.source
        mask = np.ones(len(src.joinids), dtype=bool)
        if src.nnz is not None and cfg.min_genes > 0:
            mask &= np.asarray(src.nnz) >= cfg.min_genes
        if self.split != "all":
            mask &= split_mask(
                src.split_hashes(cfg.split_key), cfg.seed, cfg.val_fraction, self.split
            )
        src.restrict(mask)
        if self.num_cells == 0:
            raise ValueError(
                f"no cells selected from {cfg.source} (split={self.split!r}, "
                f"val_fraction={cfg.val_fraction}, min_genes={cfg.min_genes}, "
                f"obs_filter={cfg.obs_filter!r}); loosen the filter or the split"
            )

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
        digest.update(np.ascontiguousarray(self.source.joinids).tobytes())
        return digest.hexdigest()

    def __len__(self) -> int:
        """Batches per epoch per rank (identical on every rank)."""
        return self.sampler.num_batches(0)

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch`; a no-op when already in it (keeps a resumed position)."""
        if epoch != self._epoch:
            self._epoch, self._start, self._batch = epoch, 0, 0

    def __iter__(self) -> Iterator[CsrBatch]:
        """Yield this rank's remaining batches of the current epoch, then advance the epoch."""
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                "CellStream runs its own reader threads; every DataLoader worker process would "
                "repeat the same batches. Use DataLoader(stream, batch_size=None, num_workers=0)"
            )
        epoch, start, first = self._epoch, self._start, self._batch
        plans = (
            p.without_first(first - p.first_batch)
            for p in self.sampler.rounds(epoch, start, first)
            if p.first_batch + len(p.batch_sizes) > first
        )
        for prepared in self._pipeline.map_rounds(plans, self._jobs, self._prepare):
            batches = self._pipeline.lookahead(partial(self._gather_batch, prepared), len(prepared))
            for i, batch in enumerate(batches):
                self._batch = prepared.plan.first_batch + i + 1
                self._metrics.add(cells=batch.num_cells, nnz=batch.num_tokens, batches=1)
                yield batch
        if (self._epoch, self._start) == (epoch, start):
            self._epoch, self._start, self._batch = epoch + 1, 0, 0

    def iter_eval(self) -> Iterator[CsrBatch]:
        """Yield every selected cell once, unshuffled; ranks disjoint with equal batch counts."""
        rows_per_round = self.sampler.K * self.sampler.C
        plans = eval_rounds(
            self.num_cells, self.world_size, self.rank, self.config.micro_batch, rows_per_round
        )
        for prepared in self._pipeline.map_rounds(plans, self._jobs, self._prepare):
            gather = partial(self._gather_batch, prepared)
            yield from self._pipeline.lookahead(gather, len(prepared))

    def _jobs(self, plan: RoundPlan) -> list[Callable[[], Piece]]:
        """Split the round's rows into read jobs of sorted, contiguous selection runs."""
        positions = np.unique(plan.rows)
        if len(positions) == 0:
            return []
        # A run may skip a few rows (a resumed round's consumed ones): one slice read beats
        # many small ones, and the reader drops rows it was not asked for.
        runs = np.split(positions, np.flatnonzero(np.diff(positions) > self.sampler.C) + 1)
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
        if self.config.mode == "direct" and self.sampler.C < SLICE_READ_MIN_CELLS:
            runs = [np.concatenate(runs)]  # one query for short runs: shared tiles read once
        pieces = [self.source.read_piece(self.source.joinids[run]) for run in runs]
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
        wanted = self.source.joinids[plan.rows]  # emission order
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
        round_index, micro = s.locate(self._start, self._batch)
        return {
            "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
            "seed": self.config.seed, "epoch": self._epoch, "start_chunk": self._start,
            "batch_in_epoch": self._batch, "round": round_index, "microbatch_in_round": micro,
            "world_size": s.W, "K": s.K, "C": s.C, "micro_batch": s.b, "drop_last": s.drop_last,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Seek to a saved position (O(1)); with another W/K/b, restart the interrupted round."""
        self._check_state(state)
        s = self.sampler
        same = (state["world_size"], state["K"], state["micro_batch"], state["drop_last"]) == (
            s.W,
            s.K,
            s.b,
            s.drop_last,
        )
        if same:
            self._epoch, self._start, self._batch = (
                state["epoch"],
                state["start_chunk"],
                state["batch_in_epoch"],
            )
            return
        old = LockstepSampler(
            self.num_cells, s.C, state["K"], state["micro_batch"], state["world_size"], 0,
            state["seed"], state["drop_last"],
        )  # fmt: skip
        start, replayed, skipped = elastic_restart(
            old, state["start_chunk"], state["batch_in_epoch"], self.config.elastic
        )
        epoch = state["epoch"] if start is not None else state["epoch"] + 1
        self._epoch, self._start, self._batch = epoch, start or 0, 0
        self._metrics.add(replayed_cells=replayed, skipped_cells=skipped)
        log.warning(
            "elastic resume W=%d K=%d -> W=%d K=%d (%s): epoch %d from chunk %d, "
            "%d cells replayed, %d skipped", state["world_size"], state["K"], s.W, s.K,
            self.config.elastic, epoch, self._start, replayed, skipped,
        )  # fmt: skip

    def _check_state(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != FORMAT_VERSION:
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
        if state["seed"] != self.config.seed or state["C"] != self.sampler.C:
            raise ValueError(
                f"loader state has seed={state['seed']}, C={state['C']} but the config has "
                f"seed={self.config.seed}, C={self.sampler.C}; restore the original values"
            )

    def metrics(self) -> dict[str, Any]:
        """Return counters: cells, nnz, batches, read_s, assemble_s, truncated/dropped/replayed."""
        return self._metrics.snapshot()

    def close(self) -> None:
        """Stop reader threads."""
        self._pipeline.close()

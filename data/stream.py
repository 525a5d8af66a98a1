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
from concurrent.futures import Future
from functools import partial
from typing import Any

import numpy as np
import tiledbsoma
import torch

from atlasldm.data.batch import CsrBatch
from atlasldm.data.config import DataConfig
from atlasldm.data.heap import release_freed_heap
from atlasldm.data.piece import Piece
from atlasldm.data.prefetch import Metrics, RoundPrefetcher
from atlasldm.data.reader import open_source
from atlasldm.data.rounds import PreparedRound, gather_batch, prepare_round, read_jobs
from atlasldm.data.sampler import LockstepSampler, RoundPlan, elastic_restart, eval_rounds
from atlasldm.data.soma import stream_context
from atlasldm.data.split import Split
from atlasldm.data.stream_layout import stream_layout
from atlasldm.data.stream_state import (
    check_state,
    position_state,
    same_layout,
    saved_restarts,
    saved_sampler,
)

log = logging.getLogger(__name__)
# Direct mode reads chunks this long as one slice each; shorter ones go in one point query per
# job: short chunks share TileDB tiles, which one query reads once, while a long chunk covers
# whole tiles and a slice lets TileDB plan a single range.
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
        self.context = stream_context(config.tiledb_config)  # shared by all reader threads
        self.source = open_source(config, self.context)
        mean_nnz = self._select()
        release_freed_heap()  # the selection's temporaries would otherwise stay resident
        self._mean_nnz = mean_nnz if np.isfinite(mean_nnz) else _ASSUMED_NNZ
        self._samplers: dict[int, LockstepSampler] = {}
        layout = stream_layout(config, self.num_cells, self.world_size, self._mean_nnz)
        self._natural_chunk_cells = layout[0]
        self._move_to_epoch(0)
        self.fingerprint = self._fingerprint()
        self._metrics = self._start_metrics()
        self._prefetch = RoundPrefetcher(config.reader_threads, config.prefetch_rounds)
        self._ahead: tuple[tuple, Future] | None = None  # (position, round) read ahead
        self._log_start()

    def _start_metrics(self) -> Metrics:
        """The stream's counters, holding its layout and selection from the start."""
        s, cfg = self.sampler, self.config
        return Metrics(
            chunk_cells=s.chunk_cells,
            chunks_per_rank_round=s.chunks_per_rank,
            prefetch_rounds=cfg.prefetch_rounds,
            reader_threads=cfg.reader_threads,
            selected_cells=self.num_cells,
            dropped_unknown_genes=self.source.dropped_genes,
            replayed_cells=0,
            skipped_cells=0,
            rounds_read_ahead=0,
        )

    def _log_start(self) -> None:
        s, cfg = self.sampler, self.config
        log.info(
            "stream rank %d/%d: %d cells (%s), C=%d K=%d prefetch=%d threads=%d, mean nnz %.0f, "
            "%d batches/epoch",
            self.rank,
            self.world_size,
            self.num_cells,
            self.split,
            s.chunk_cells,
            s.chunks_per_rank,
            cfg.prefetch_rounds,
            cfg.reader_threads,
            self._mean_nnz,
            len(self),
        )

    @property
    def sampler(self) -> LockstepSampler:
        """The sampler of the current epoch (its C is the natural one except in a resumed epoch)."""
        return self._sampler_for(self._chunk_cells)

    def _sampler_for(self, C: int) -> LockstepSampler:
        if C not in self._samplers:
            cfg = self.config
            _, K = stream_layout(cfg, self.num_cells, self.world_size, self._mean_nnz, C)
            self._samplers[C] = LockstepSampler(
                num_rows=self.num_cells,
                chunk_cells=C,
                chunks_per_rank=K,
                micro_batch=cfg.micro_batch,
                world_size=self.world_size,
                rank=self.rank,
                seed=cfg.seed,
                drop_last=cfg.drop_last,
            )
        return self._samplers[C]

    def _move_to_epoch(self, epoch: int) -> None:
        self._epoch, self._restarts, self._batch = epoch, (), 0
        self._chunk_cells = self._natural_chunk_cells

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
            "split": self.split,
            "val_fraction": cfg.val_fraction,
            "split_key": cfg.split_key,
            "obs_filter": cfg.obs_filter,
            "C": cfg.effective_chunk_cells,
            "min_genes": cfg.min_genes,
            "max_genes": cfg.max_genes,
            "conditions": list(cfg.condition_columns),
        }
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
        launched = self._claim_read_ahead()
        if launched is not None:
            next(plans)  # its round is the one read ahead
        then = partial(self._read_ahead, epoch + 1)
        rounds = self._prefetch.map_rounds(plans, self._jobs, self._prepare, launched, then)
        for prepared in rounds:
            self._start_round(prepared)
            batches = self._prefetch.lookahead(partial(self._gather_batch, prepared), len(prepared))
            for i, batch in enumerate(batches):
                self._batch = prepared.plan.first_batch + i + 1
                self._metrics.add(cells=batch.num_cells, nnz=batch.num_tokens, batches=1)
                yield batch
        if (self._epoch, self._restarts) == (epoch, restarts):
            self._move_to_epoch(epoch + 1)

    def _read_ahead(self, epoch: int) -> None:
        """Launch the first round of `epoch` while the last rounds of this one are read.

        The next `__iter__` claims it if it starts exactly there (the usual loop: the epoch
        ran to its end, then set_epoch(epoch) or nothing); any other position discards it. A
        loop over epochs thus never waits for a fresh epoch's first read, which at small N
        is a large share of an epoch. Only with reader threads and the layout's own C (a
        resumed epoch under an old C ends without it).
        """
        self._discard_read_ahead()
        C = self._natural_chunk_cells
        if self.config.reader_threads == 0 or self._chunk_cells != C:
            return
        plan = next(iter(self._sampler_for(C).rounds(epoch)), None)
        if plan is not None:
            future = self._prefetch.launch(plan, self._jobs, self._prepare)
            self._ahead = ((epoch, (), 0, C), future)

    def _claim_read_ahead(self) -> Future | None:
        """The round read ahead for the current position, if any (else it is discarded)."""
        position = (self._epoch, self._restarts, self._batch, self._chunk_cells)
        if self._ahead is None or self._ahead[0] != position:
            self._discard_read_ahead()
            return None
        future, self._ahead = self._ahead[1], None
        self._metrics.add(rounds_read_ahead=1)
        return future

    def _discard_read_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None

    def iter_eval(self) -> Iterator[CsrBatch]:
        """Yield every selected cell once, unshuffled; ranks disjoint with equal batch counts."""
        rows_per_round = self.sampler.chunks_per_rank * self.sampler.chunk_cells
        plans = eval_rounds(
            self.num_cells, self.world_size, self.rank, self.config.micro_batch, rows_per_round
        )
        for prepared in self._prefetch.map_rounds(plans, self._jobs, self._prepare):
            self._start_round(prepared)
            gather = partial(self._gather_batch, prepared)
            yield from self._prefetch.lookahead(gather, len(prepared))

    def _start_round(self, prepared: PreparedRound) -> None:
        """Count a round as it starts to be emitted (a round read ahead may never be)."""
        self._clear_tiledb_stats()
        self._metrics.add(dropped_unknown_nnz=sum(p.dropped_nnz for p in prepared.pieces))

    def _clear_tiledb_stats(self) -> None:
        """Drop TileDB's per-query statistics, which it keeps even with statistics disabled.

        Without this a direct-mode rank grew by ~10 MB per 1,000 batches (measured at 500k and
        5M cells), so its memory depended on how far into the run it was. The reset is
        process-wide and clears statistics a user enabled: `keep_tiledb_stats=True` keeps them.
        """
        if self.source.reads_tiledb and not self.config.keep_tiledb_stats:
            tiledbsoma.tiledbsoma_stats_reset()

    def _jobs(self, plan: RoundPlan) -> list[Callable[[], list[Piece]]]:
        """The round's read jobs (`read_jobs`), each reading its runs with `_read`."""
        return read_jobs(plan, self.sampler.chunk_cells, self.config.reader_threads, self._read)

    def _read(self, runs: list[np.ndarray]) -> list[Piece]:
        t0 = time.perf_counter()
        if self.config.mode == "direct" and self.sampler.chunk_cells < SLICE_READ_MIN_CELLS:
            runs = [np.concatenate(runs)]  # one query for short runs: shared tiles read once
        pieces = [self.source.read_piece(self.source.ids(run)) for run in runs]
        self._metrics.add(read_s=time.perf_counter() - t0)
        return pieces

    def _prepare(self, plan: RoundPlan, groups: list[list[Piece]]) -> PreparedRound:
        """Locate each emitted row of the round in its read pieces (`prepare_round`)."""
        t0 = time.perf_counter()
        pieces = [p for group in groups for p in group]
        prepared = prepare_round(plan, pieces, self.source)
        self._metrics.add(assemble_s=time.perf_counter() - t0)
        return prepared

    def _gather_batch(self, prepared: PreparedRound, index: int) -> CsrBatch:
        """Copy batch `index` out of a prepared round, cut to max_genes (`gather_batch`)."""
        t0 = time.perf_counter()
        cfg = self.config
        names = self.source.condition_names
        batch, cut = gather_batch(prepared, index, names, cfg.max_genes, cfg.seed)
        self._metrics.add(assemble_s=time.perf_counter() - t0, truncated_cells=cut)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Return the position; identical on every rank (safe for rank-0 client_state)."""
        return position_state(
            self.sampler, self.fingerprint, self._epoch, self._restarts, self._batch
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Seek to a saved position (O(1)); with another W/K/b, restart the interrupted round.

        The saved epoch finishes with the C it started with; the next epoch uses this layout's.
        """
        check_state(state, self.fingerprint, self.config.seed)
        if state["format_version"] == 1:
            self._load_v1(state)
            return
        restarts = saved_restarts(state)
        self._epoch, self._chunk_cells = state["epoch"], state["C"]
        self._restarts, self._batch = restarts, state["batch_in_epoch"]
        sampler = self.sampler  # of the saved epoch's C
        if same_layout(state, sampler):
            return
        old = saved_sampler(state, self.num_cells)
        moved = elastic_restart(old, restarts, state["batch_in_epoch"], self.config.elastic)
        if moved.restarts is None:
            self._move_to_epoch(state["epoch"] + 1)
        else:
            self._restarts, self._batch = moved.restarts, 0
        self._metrics.add(replayed_cells=moved.replayed_cells, skipped_cells=moved.skipped_cells)
        log.warning(
            "elastic resume W=%d K=%d -> W=%d K=%d (%s): epoch %d, segment %d, "
            "%d cells replayed, %d skipped",
            old.world_size,
            old.chunks_per_rank,
            sampler.world_size,
            sampler.chunks_per_rank,
            self.config.elastic,
            self._epoch,
            len(self._restarts),
            moved.replayed_cells,
            moved.skipped_cells,
        )

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
                state["epoch"],
                state["batch_in_epoch"],
            )

    def metrics(self) -> dict[str, Any]:
        """Return counters: cells, nnz, batches, read_s, assemble_s, truncated/dropped/replayed,
        rounds_read_ahead (epochs whose first round was read during the previous epoch)."""
        return self._metrics.snapshot()

    def close(self) -> None:
        """Stop reader threads."""
        self._discard_read_ahead()
        self._prefetch.close()

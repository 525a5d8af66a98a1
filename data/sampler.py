"""Deterministic lockstep global sampler: pure numpy, no IO.

Design: docs/loader.md, "Chunks and the stratified order", "Rank-contiguous layout", "Tail policy".

Rows are positions 0..N-1 in the sorted selection. They are cut into chunks of C consecutive
rows: F = N // C full chunks plus, when C does not divide N, one partial chunk of N % C rows.

* **Chunk order.** Epoch e orders the F full chunks by a *stratified permutation* drawn from
  Philox keyed by (seed, e) (`stratified_permutation`): every run of consecutive chunks of the
  order is spread over the whole selection about as evenly as a run of its length can be. On a
  Census-layout experiment, where datasets are contiguous, any run then samples the datasets in
  proportion; on a pre-permuted training copy it is simply a random order. The order depends
  on (seed, e, F) only, never on the world size.
* **Segments.** An epoch is one segment, the whole order, unless an elastic resume cut it: then
  the epoch goes on with a new segment, the chunks the interrupted layout had not finished
  (`Restart`, `segment_chunks`). A segment of L chunks under layout (W ranks, K chunks per rank
  round) has R = L // (W*K) full rounds per rank.
* **Rank-contiguous layout.** Rank r owns the run `segment[r*R*K : (r+1)*R*K]` and reads it K
  chunks per round. A rank's round is a run of K chunks (spread over the selection, so its
  batches mix the datasets) and its epoch is a run of R*K chunks (spread, so its epoch mix is
  the global mix up to about one chunk per dataset boundary), at every world size.
* Rows of a rank's round are permuted with Philox keyed by (seed, e, segment, round, r) and cut
  into K*C/b micro-batches (K*C is a multiple of b, so no row carries over).
* **Tail policy.** The rows after the ranks' full rounds (T < W*K*C + C rows: the remaining
  chunks of the segment, then the partial chunk) are rotated by an offset drawn from
  (seed, e, segment) and split evenly by rows across ranks (sizes differ by at most one). Every
  rank then emits the same number of tail batches:
  - `drop_last=False` (default): ceil(T / (W*b)) batches per rank, holding its T//W or T//W+1
    rows: full batches of b cells and a smaller last one. When that last batch would be empty,
    the rank's tail rows are spread over near-equal batches instead. A batch is empty (B = 0)
    only when a rank has fewer tail rows than tail batches (T < W, or b = 1); the training loop
    runs such a step on a stand-in cell with zero weight, so collectives stay in lockstep.
  - `drop_last=True`: floor(T / (W*b)) full batches per rank; every batch has exactly b cells
    and fewer than W*b cells of an epoch are dropped, a different window of the rotated tail
    each epoch.
  Every selected row is emitted exactly once per epoch across ranks (drop_last=False), ranks are
  disjoint, and all ranks take the same number of steps: (full rounds) * K*C/b + tail batches.
* The position (epoch, restarts, batches consumed in the segment) is the whole state: any batch
  is found by regenerating permutations from their counters, with no replay.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


def philox(seed: int, *words: int | str) -> np.random.Generator:
    """Return a Philox generator whose 128-bit key is a hash of (seed, *words), counter 0."""
    digest = hashlib.blake2b(repr((int(seed), *words)).encode(), digest_size=16).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


def stratified_permutation(n: int, rng: np.random.Generator) -> np.ndarray:
    """Return a random permutation of range(n) whose consecutive runs are spread over the range.

    Owen-scrambled radical inverse: the bits of order position p, least significant first,
    choose the path of id(p) down a binary tree over [0, 2^B) whose two children are swapped at
    random at every node (2^B - 1 coin flips). Any aligned run of 2^k positions then holds
    exactly one id from each of the 2^k equal intervals of [0, 2^B); ids >= n are skipped, which
    keeps the spread of every run. Each id's position is uniform, as in a plain permutation.
    """
    if n <= 1:
        return np.arange(n, dtype=np.int64)
    bits = (n - 1).bit_length()
    positions = np.arange(1 << bits, dtype=np.int64)
    ids = np.zeros_like(positions)  # after level l: the top l bits of each id
    for level in range(bits):
        flips = rng.integers(0, 2, size=1 << level, dtype=np.int64)  # one per tree node
        ids = (ids << 1) | (((positions >> level) & 1) ^ flips[ids])
    return ids[ids < n]


@lru_cache(maxsize=4)
def chunk_order(seed: int, epoch: int, num_chunks: int) -> np.ndarray:
    """Return epoch `epoch`'s stratified order of `num_chunks` full chunks (shared by ranks)."""
    order = stratified_permutation(num_chunks, philox(seed, "chunks", epoch))
    order.flags.writeable = False  # cached and shared: nobody may edit it in place
    return order


@dataclass(frozen=True)
class Restart:
    """Where an earlier layout of the same epoch stopped; an elastic resume starts a segment."""

    world_size: int  # W of the interrupted layout
    chunks_per_rank: int  # K of the interrupted layout
    round: int  # its interrupted round (== its full rounds R when it stopped in the tail)
    skip: bool  # True: that round's unconsumed cells are skipped; False: it is replayed


def _full_rounds(length: int, restart: Restart) -> int:
    return length // (restart.world_size * restart.chunks_per_rank)


def _remaining_length(length: int, restart: Restart) -> int:
    """Chunks of a segment of `length` chunks left after `restart` (see `_remaining`)."""
    W, K = restart.world_size, restart.chunks_per_rank
    R = _full_rounds(length, restart)
    tail = length - W * R * K
    if restart.round >= R:  # stopped in the tail
        return 0 if restart.skip else tail
    return W * (R - restart.round - restart.skip) * K + tail


def _remaining(segment: np.ndarray, restart: Restart) -> np.ndarray:
    """Return the chunks of `segment` that the layout in `restart` had not finished.

    Each rank's unfinished rounds stay a run of the order, and the runs are concatenated, so
    the new layout's ranks still read runs of the stratified order.
    """
    W, K = restart.world_size, restart.chunks_per_rank
    R = _full_rounds(len(segment), restart)
    tail = segment[W * R * K :]
    if restart.round >= R:
        return tail[:0] if restart.skip else tail
    first = restart.round + restart.skip
    runs = [segment[r * R * K + first * K : (r + 1) * R * K] for r in range(W)]
    return np.concatenate([*runs, tail])


def segment_length(num_chunks: int, restarts: tuple[Restart, ...]) -> int:
    """Return the chunks of the segment that follows `restarts` (no permutation needed)."""
    length = num_chunks
    for restart in restarts:
        length = _remaining_length(length, restart)
    return length


@lru_cache(maxsize=4)
def segment_chunks(
    seed: int, epoch: int, num_chunks: int, restarts: tuple[Restart, ...]
) -> np.ndarray:
    """Return the segment's chunk ids in order: the epoch order cut by every restart in turn."""
    segment = chunk_order(seed, epoch, num_chunks)
    for restart in restarts:
        segment = _remaining(segment, restart)
    return segment


@dataclass(frozen=True)
class RoundPlan:
    """The rows one rank emits in one IO round, in emission order, and its batch sizes."""

    index: int  # round index within the epoch segment
    first_batch: int  # batch index (within the epoch segment) of the round's first batch
    rows: np.ndarray  # int64 (n,), positions into the sorted selection, emission order
    batch_sizes: np.ndarray  # int64 (n_batches,), sum == n

    def without_first(self, batches: int) -> RoundPlan:
        """Return the plan minus its first `batches` batches (resume inside a round)."""
        if batches <= 0:
            return self
        rows = int(self.batch_sizes[:batches].sum())
        return RoundPlan(
            self.index, self.first_batch + batches, self.rows[rows:], self.batch_sizes[batches:]
        )


def _split_sizes(total: int, parts: int) -> np.ndarray:
    """Return `parts` near-equal sizes summing to `total`, larger ones first."""
    q, rem = divmod(total, parts)
    return np.array([q + 1] * rem + [q] * (parts - rem), dtype=np.int64)


@dataclass(frozen=True)
class SegmentLayout:
    """How a segment splits: full rounds per rank, tail rows, tail batches per rank."""

    full_rounds: int
    tail_rows: int
    tail_batches: int


class LockstepSampler:
    """Plans which selected rows rank `rank` of `world_size` emits, batch by batch."""

    def __init__(
        self,
        num_rows: int,
        chunk_cells: int,
        chunks_per_rank: int,
        micro_batch: int,
        world_size: int,
        rank: int,
        seed: int,
        drop_last: bool = False,
    ):
        if chunk_cells < 1 or chunks_per_rank < 1 or (chunks_per_rank * chunk_cells) % micro_batch:
            raise ValueError(
                f"K*C = {chunks_per_rank}*{chunk_cells} must be a positive multiple of "
                f"micro_batch={micro_batch}; change chunks_per_rank_round or micro_batch"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.num_rows, self.chunk_cells, self.chunks_per_rank = (
            num_rows,
            chunk_cells,
            chunks_per_rank,
        )
        self.micro_batch, self.world_size, self.rank = micro_batch, world_size, rank
        self.seed, self.drop_last = seed, drop_last
        self.num_chunks = num_rows // chunk_cells  # full chunks; the partial one is chunk F
        self.batches_per_round = chunks_per_rank * chunk_cells // micro_batch

    def layout(self, restarts: tuple[Restart, ...] = ()) -> SegmentLayout:
        """Return the split of the segment that follows `restarts` (() = the whole epoch)."""
        length = segment_length(self.num_chunks, restarts)
        W, K, C = self.world_size, self.chunks_per_rank, self.chunk_cells
        rounds = length // (W * K)
        tail = (length - W * K * rounds) * C + self.num_rows % C
        per_step = W * self.micro_batch
        tail_batches = tail // per_step if self.drop_last else -(-tail // per_step)
        return SegmentLayout(rounds, tail, tail_batches)

    def num_batches(self, restarts: tuple[Restart, ...] = ()) -> int:
        """Return the batches every rank emits in the segment that follows `restarts`."""
        layout = self.layout(restarts)
        return layout.full_rounds * self.batches_per_round + layout.tail_batches

    def locate(self, restarts: tuple[Restart, ...], batch: int) -> tuple[int, int]:
        """Return (round, micro-batch within round) of segment batch index `batch`."""
        rounds = self.layout(restarts).full_rounds
        if batch < rounds * self.batches_per_round:
            return divmod(batch, self.batches_per_round)
        return rounds, batch - rounds * self.batches_per_round

    def tail_batch_sizes(self, layout: SegmentLayout, rank: int) -> np.ndarray:
        """Return the tail batch sizes of `rank` (int64, one per tail batch)."""
        if layout.tail_batches == 0:
            return np.zeros(0, dtype=np.int64)
        b = self.micro_batch
        if self.drop_last:
            return np.full(layout.tail_batches, b, dtype=np.int64)
        rows = int(_split_sizes(layout.tail_rows, self.world_size)[rank])
        last = rows - (layout.tail_batches - 1) * b  # >= 0 because rows <= tail_batches * b
        if last > 0:  # full batches, then one smaller batch
            return np.array([b] * (layout.tail_batches - 1) + [last], dtype=np.int64)
        return _split_sizes(rows, layout.tail_batches)  # rare: avoid an empty last batch

    def round_plan(self, epoch: int, restarts: tuple[Restart, ...], index: int) -> RoundPlan:
        """Return this rank's plan for round `index` of the segment that follows `restarts`."""
        layout = self.layout(restarts)
        segment = segment_chunks(self.seed, epoch, self.num_chunks, restarts)
        K, C = self.chunks_per_rank, self.chunk_cells
        if index < layout.full_rounds:
            first = (self.rank * layout.full_rounds + index) * K
            chunks = segment[first : first + K]
            rows = (chunks[:, None] * C + np.arange(C, dtype=np.int64)).ravel()
            sizes = np.full(self.batches_per_round, self.micro_batch, dtype=np.int64)
        elif index == layout.full_rounds and layout.tail_batches > 0:
            sizes = self.tail_batch_sizes(layout, self.rank)
            tail_chunks = segment[self.world_size * layout.full_rounds * K :]
            rows = self._tail_rows(tail_chunks, layout, epoch, len(restarts), int(sizes.sum()))
        else:
            raise IndexError(f"round {index} is past the end of the epoch")
        key = (self.seed, "rows", epoch, len(restarts), index, self.rank)
        perm = philox(*key).permutation(len(rows))
        return RoundPlan(index, index * self.batches_per_round, rows[perm], sizes)

    def _tail_rows(
        self, chunks: np.ndarray, layout: SegmentLayout, epoch: int, segment: int, take: int
    ) -> np.ndarray:
        """Return this rank's `take` rows of the tail, a window of it after a random rotation.

        The tail is the rows of `chunks` followed by the partial chunk; only the window is
        materialised, so W ranks cost O(T) together, not O(W*T).
        """
        if take == 0:
            return np.zeros(0, dtype=np.int64)
        T, C = layout.tail_rows, self.chunk_cells
        offset = int(philox(self.seed, "tail", epoch, segment).integers(T))
        if self.drop_last:
            start = self.rank * take
        else:
            start = int(_split_sizes(T, self.world_size)[: self.rank].sum())
        at = (offset + start + np.arange(take, dtype=np.int64)) % T
        in_chunks = at < len(chunks) * C
        rows = np.empty(take, dtype=np.int64)
        rows[in_chunks] = chunks[at[in_chunks] // C] * C + at[in_chunks] % C
        # tail position len(chunks)*C + j is row F*C + j of the partial chunk
        rows[~in_chunks] = self.num_chunks * C + at[~in_chunks] - len(chunks) * C
        return rows

    def rounds(
        self, epoch: int, restarts: tuple[Restart, ...] = (), from_batch: int = 0
    ) -> Iterator[RoundPlan]:
        """Yield round plans from the one holding segment batch `from_batch` to the segment end."""
        layout = self.layout(restarts)
        total_rounds = layout.full_rounds + (layout.tail_batches > 0)
        for index in range(self.locate(restarts, from_batch)[0], total_rounds):
            yield self.round_plan(epoch, restarts, index)

    def consumed_in_round(self, restarts: tuple[Restart, ...], batch: int) -> tuple[int, int, int]:
        """Return (round, cells all ranks consumed in it before `batch`, cells in the round)."""
        layout = self.layout(restarts)
        index, micro = self.locate(restarts, batch)
        if index < layout.full_rounds:
            W, b = self.world_size, self.micro_batch
            return index, micro * b * W, W * self.chunks_per_rank * self.chunk_cells
        done = sum(
            int(self.tail_batch_sizes(layout, r)[:micro].sum()) for r in range(self.world_size)
        )
        return index, done, layout.tail_rows


def eval_rounds(
    num_rows: int, world_size: int, rank: int, micro_batch: int, rows_per_round: int
) -> Iterator[RoundPlan]:
    """Yield unshuffled plans covering every row once: ranks disjoint, equal batch counts.

    Rank r takes a contiguous block of N//W or N//W+1 sorted rows and cuts it into
    ceil(ceil(N/W)/b) near-equal batches of at most b cells (a batch is empty only if N < W).
    """
    sizes_rank = _split_sizes(num_rows, world_size)
    start = int(sizes_rank[:rank].sum())
    n_batches = -(-int(sizes_rank[0]) // micro_batch)
    sizes = _split_sizes(int(sizes_rank[rank]), n_batches) if n_batches else np.zeros(0, np.int64)
    per_round = max(1, rows_per_round // micro_batch)
    offsets = np.concatenate([[0], np.cumsum(sizes)]) + start
    for index, b0 in enumerate(range(0, n_batches, per_round)):
        b1 = min(b0 + per_round, n_batches)
        rows = np.arange(offsets[b0], offsets[b1], dtype=np.int64)
        yield RoundPlan(index, b0, rows, sizes[b0:b1])


@dataclass(frozen=True)
class ElasticRestart:
    """The outcome of mapping a saved position onto a new layout."""

    restarts: tuple[Restart, ...] | None  # the new segment's restarts; None = next epoch
    replayed_cells: int  # cells consumed before the save that the new segment emits again
    skipped_cells: int  # cells of the epoch that will not be emitted (skip_round only)


def elastic_restart(
    old: LockstepSampler, restarts: tuple[Restart, ...], batch: int, policy: str
) -> ElasticRestart:
    """Map a position saved under another (W, K, b) layout to a new segment of the same epoch.

    Args:
        old: a sampler with the saved layout (any rank; same C as the saved position).
        restarts: the saved segment's restarts.
        batch: batches consumed in the saved segment.
        policy: "restart_round" replays the interrupted round's consumed cells (no cell of the
            epoch is lost); "skip_round" continues after it (its unconsumed cells are skipped).
    """
    if policy not in ("restart_round", "skip_round"):
        raise ValueError(f"elastic={policy!r} must be 'restart_round' or 'skip_round'")
    if batch >= old.num_batches(restarts):
        return ElasticRestart(None, 0, 0)
    index, done, size = old.consumed_in_round(restarts, batch)
    skip = policy == "skip_round"
    new = (*restarts, Restart(old.world_size, old.chunks_per_rank, index, skip))
    in_tail = index >= old.layout(restarts).full_rounds
    rows_left = (
        segment_length(old.num_chunks, new) * old.chunk_cells + old.num_rows % old.chunk_cells
    )
    if (skip and in_tail) or rows_left == 0:
        new = None  # nothing of the epoch is left
    return ElasticRestart(new, 0 if skip else done, size - done if skip else 0)

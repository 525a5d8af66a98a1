"""Deterministic lockstep global sampler (loader.md §3.3): pure numpy, no IO.

Rows are positions 0..N-1 in the sorted selection. They are cut into chunks of C consecutive
rows: F = N // C full chunks plus, when C does not divide N, one partial chunk of N % C rows.

* Epoch e permutes the F full chunks with a **stratified permutation** drawn from Philox keyed
  by (seed, e) (`stratified_permutation`): every aligned run of 2^k consecutive chunks of the
  order holds one chunk from each 1/2^k of the selection, and any run is spread nearly as well,
  so each rank's round covers the whole joinid range. On a Census-layout experiment, where
  datasets are contiguous, a round then samples the datasets in proportion even with large
  chunks; on a pre-permuted copy it is simply a random order. The order depends on (seed, e, F)
  only, never on W or K, which elastic resume relies on. The partial chunk comes last.
  The list is cut into IO rounds of W*K chunks starting at `start_chunk` (0, or the round
  boundary an elastic resume restarted from), so all ranks draw from one global permutation.
  A round is a W x K block of consecutive chunks; in round i, rank r takes from column k the
  chunk in row pi_k((r + i) mod W), pi_k a permutation of the W rows drawn from (seed, e, k).
  Each rank's K chunks are thus as spread as a run of K, and over any W consecutive rounds a
  rank takes every row of every column: with the stratified order, one chunk of each 1/(W*K)
  of the selection (taking row r of every block would give rank r the same 1/W of every
  stratum all epoch).
* Rows of a rank's round are permuted with Philox keyed by (seed, e, round's first chunk, r)
  and cut into K*C/b micro-batches (K*C is a multiple of b, so no row carries over).
* **Tail policy.** The rows after the last full round (T < W*K*C + C rows: the remaining chunks
  in permuted order, then the partial chunk) are rotated by an offset drawn from
  (seed, e, first tail chunk) and split evenly by rows across ranks (sizes differ by at most
  one). Every rank then emits the same number of tail batches:
  - `drop_last=False` (default): ceil(T / (W*b)) batches per rank, holding its T//W or T//W+1
    rows: full batches of b cells and a smaller last one (its size differs by at most one cell
    across ranks). When that last batch would be empty, the rank's tail rows are spread over
    near-equal batches instead. Every selected row is emitted exactly once per epoch across
    ranks, ranks are disjoint, and all ranks take the same number of steps (equal batch COUNT is
    what ZeRO collectives need). A batch is empty only when a rank has fewer tail rows than tail
    batches (T < W, or b = 1).
  - `drop_last=True`: floor(T / (W*b)) full batches per rank; every batch has exactly b cells
    and at most W*b-1 cells of an epoch are dropped. The dropped cells are a window of the
    rotated, permuted tail, so they differ from epoch to epoch.
  Steps per rank per epoch = (full rounds) * K*C/b + tail batches, identical on every rank.
* The position (epoch, start_chunk, batches consumed) is the whole state: any batch is found by
  regenerating permutations from their counters, with no replay (`locate`, `round_plan`).
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


@dataclass(frozen=True)
class RoundPlan:
    """The rows one rank emits in one IO round, in emission order, and its batch sizes."""

    index: int  # round index within the epoch segment
    first_chunk: int  # position of the round's first chunk in the permuted chunk list
    first_batch: int  # batch index (within the epoch segment) of the round's first batch
    rows: np.ndarray  # int64 (n,), positions into the sorted selection, emission order
    batch_sizes: np.ndarray  # int64 (n_batches,), sum == n

    def without_first(self, batches: int) -> RoundPlan:
        """Return the plan minus its first `batches` batches (resume inside a round)."""
        if batches <= 0:
            return self
        rows = int(self.batch_sizes[:batches].sum())
        return RoundPlan(
            self.index, self.first_chunk, self.first_batch + batches,
            self.rows[rows:], self.batch_sizes[batches:],
        )  # fmt: skip


def _split_sizes(total: int, parts: int) -> np.ndarray:
    """Return `parts` near-equal sizes summing to `total`, larger ones first."""
    q, rem = divmod(total, parts)
    return np.array([q + 1] * rem + [q] * (parts - rem), dtype=np.int64)


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
        if (chunks_per_rank * chunk_cells) % micro_batch or chunk_cells < 1:
            raise ValueError(
                f"K*C = {chunks_per_rank}*{chunk_cells} must be a positive multiple of "
                f"micro_batch={micro_batch}; change chunks_per_rank_round or micro_batch"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.N, self.C, self.K, self.b = num_rows, chunk_cells, chunks_per_rank, micro_batch
        self.W, self.rank, self.seed, self.drop_last = world_size, rank, seed, drop_last
        self.F = num_rows // chunk_cells  # full chunks; the partial chunk (if any) is chunk F
        self.per_round = self.K * self.C // self.b  # batches per rank per full round
        self._order = lru_cache(maxsize=2)(self._chunk_order)

    def _chunk_order(self, epoch: int) -> np.ndarray:
        return stratified_permutation(self.F, philox(self.seed, "chunks", epoch))

    def chunk_order(self, epoch: int) -> np.ndarray:
        """Return the permuted full-chunk ids of `epoch`, int64 (F,)."""
        return self._order(epoch)

    def _block_rows(self, epoch: int) -> np.ndarray:
        """Return (W, K) int64: column k is the permutation pi_k of the round's W block rows."""
        rows = np.tile(np.arange(self.W, dtype=np.int64)[:, None], (1, self.K))
        return philox(self.seed, "ranks", epoch).permuted(rows, axis=0)

    def layout(self, start_chunk: int = 0) -> tuple[int, int, int]:
        """Return (full rounds, tail rows T, tail batches per rank) from `start_chunk` on."""
        if not 0 <= start_chunk <= self.F:
            raise ValueError(f"start_chunk={start_chunk} outside [0, {self.F}]")
        rounds = (self.F - start_chunk) // (self.W * self.K)
        tail = self.N - (start_chunk + rounds * self.W * self.K) * self.C
        per_step = self.W * self.b
        tail_batches = tail // per_step if self.drop_last else -(-tail // per_step)
        return rounds, tail, tail_batches

    def num_batches(self, start_chunk: int = 0) -> int:
        """Return the batches every rank emits in an epoch segment starting at `start_chunk`."""
        rounds, _, tail_batches = self.layout(start_chunk)
        return rounds * self.per_round + tail_batches

    def locate(self, start_chunk: int, batch: int) -> tuple[int, int]:
        """Return (round, micro-batch within round) of segment batch index `batch`."""
        rounds, _, _ = self.layout(start_chunk)
        if batch < rounds * self.per_round:
            return divmod(batch, self.per_round)
        return rounds, batch - rounds * self.per_round

    def tail_batch_sizes(self, tail_rows: int, tail_batches: int, rank: int) -> np.ndarray:
        """Return the tail batch sizes of `rank` (int64, one per tail batch)."""
        if tail_batches == 0:
            return np.zeros(0, dtype=np.int64)
        if self.drop_last:
            return np.full(tail_batches, self.b, dtype=np.int64)
        rows = int(_split_sizes(tail_rows, self.W)[rank])
        last = rows - (tail_batches - 1) * self.b  # >= 0 because rows <= tail_batches * b
        if last > 0:  # full batches, then one smaller batch
            return np.array([self.b] * (tail_batches - 1) + [last], dtype=np.int64)
        return _split_sizes(rows, tail_batches)  # rare: avoid an empty last batch

    def round_plan(self, epoch: int, start_chunk: int, index: int) -> RoundPlan:
        """Return this rank's plan for round `index` of the segment starting at `start_chunk`."""
        rounds, tail, tail_batches = self.layout(start_chunk)
        first = start_chunk + index * self.W * self.K
        order = self.chunk_order(epoch)
        if index < rounds:
            block = order[first : first + self.W * self.K].reshape(self.W, self.K)
            chunks = block[self._block_rows(epoch)[(self.rank + index) % self.W], np.arange(self.K)]
            sizes = np.full(self.per_round, self.b, dtype=np.int64)
        elif index == rounds and tail_batches > 0:
            chunks, sizes = order[first:], self.tail_batch_sizes(tail, tail_batches, self.rank)
        else:
            raise IndexError(f"round {index} is past the end of the epoch")
        rows = (chunks[:, None] * self.C + np.arange(self.C, dtype=np.int64)).ravel()
        if index == rounds:
            rows = np.concatenate([rows, np.arange(self.F * self.C, self.N, dtype=np.int64)])
            rows = self._tail_slice(rows, epoch, first, int(sizes.sum()))
        perm = philox(self.seed, "rows", epoch, first, self.rank).permutation(len(rows))
        first_batch = index * self.per_round
        return RoundPlan(index, first, first_batch, rows[perm], sizes)

    def _tail_slice(self, tail: np.ndarray, epoch: int, first: int, take: int) -> np.ndarray:
        """Return this rank's `take` rows of the tail after an epoch-dependent rotation."""
        offset = int(philox(self.seed, "tail", epoch, first).integers(len(tail)))
        if self.drop_last:
            start = self.rank * take
        else:
            start = int(_split_sizes(len(tail), self.W)[: self.rank].sum())
        return tail[(offset + start + np.arange(take)) % len(tail)]

    def rounds(self, epoch: int, start_chunk: int = 0, from_batch: int = 0) -> Iterator[RoundPlan]:
        """Yield round plans from the one holding segment batch `from_batch` to the epoch end."""
        total_rounds = self.layout(start_chunk)[0] + (self.layout(start_chunk)[2] > 0)
        first_round = self.locate(start_chunk, from_batch)[0]
        for index in range(first_round, total_rounds):
            yield self.round_plan(epoch, start_chunk, index)

    def consumed_in_round(self, start_chunk: int, batch: int) -> tuple[int, int, int]:
        """Return (round, cells all ranks consumed in it before `batch`, cells in the round)."""
        rounds, tail, tail_batches = self.layout(start_chunk)
        index, micro = self.locate(start_chunk, batch)
        if index < rounds:
            return index, micro * self.b * self.W, self.W * self.K * self.C
        done = sum(
            int(self.tail_batch_sizes(tail, tail_batches, r)[:micro].sum()) for r in range(self.W)
        )
        return index, done, tail


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
        yield RoundPlan(index, 0, b0, rows, sizes[b0:b1])


def elastic_restart(
    old: LockstepSampler, start_chunk: int, batch: int, policy: str
) -> tuple[int | None, int, int]:
    """Map a position saved under another (W, K, b) to a new segment start.

    Args:
        old: a sampler with the saved world size, K and micro-batch (any rank).
        start_chunk: the saved segment start.
        batch: batches consumed in the saved segment.
        policy: "restart_round" replays the interrupted round's consumed cells (no cell of the
            epoch is lost); "skip_round" continues after it (its unconsumed cells are skipped).

    Returns:
        (new start_chunk, or None to continue with the next epoch; replayed cells; skipped cells).
    """
    if batch >= old.num_batches(start_chunk):
        return None, 0, 0
    index, done, size = old.consumed_in_round(start_chunk, batch)
    rounds = old.layout(start_chunk)[0]
    first = start_chunk + index * old.W * old.K
    if policy == "restart_round":
        return first, done, 0
    if policy != "skip_round":
        raise ValueError(f"elastic={policy!r} must be 'restart_round' or 'skip_round'")
    return (first + old.W * old.K if index < rounds else None), 0, size - done

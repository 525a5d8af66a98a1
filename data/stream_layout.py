"""The stream's layout: chunk length C and chunks per rank round K, from the config and memory.

Design: docs/loader.md, "Chunks and the stratified order" and "Reading and the memory budget".
"""

from __future__ import annotations

import math

from atlasldm.data.config import DataConfig

# Bytes a round holds per nnz: its read pieces (int32 token, float32 count). Batches are copied
# out of them a few at a time and the Arrow buffers of a read live for one chunk only; the
# budget keeps half of the memory for those, side arrays, Python and torch
# (docs/loader.md, "Reading and the memory budget").
BYTES_PER_NNZ = 8
# Cells per rank per IO round at most, when K is derived. A round's first batch waits for the
# whole round to be read, so this bounds the wait for the first batch after a (re)start.
MAX_ROUND_CELLS = 24576
# Direct mode lowers the default chunk length until every rank reads at least this many chunks
# per epoch: a rank's batches can only mix as many datasets as its round has chunks, and its
# epoch mix is off by about one chunk per dataset boundary (see docs/loader.md, diversity).
MIN_RANK_CHUNKS = 256
# A single rank's epoch is the whole selection, so its mix is exact and only the batches' mixing
# (chunks per round) is at stake: it needs fewer chunks. Each halving of C below the tile's rows
# costs read CPU (a read decodes whole TileDB tiles; docs/loader_profile.md): at 100,000 cells
# C = 512 read 0.76x the CPU per nonzero of C = 256, at batch diversity 0.98 instead of 0.99.
MIN_SINGLE_RANK_CHUNKS = 128


def chunks_per_rank_from_budget(
    mean_nnz: float,
    chunk_cells: int,
    micro_batch: int,
    budget_gb: float,
    prefetch_rounds: int,
    max_chunks: int | None = None,
) -> int:
    """Return K so that the rounds in flight fit half the per-rank memory budget.

    In flight: the round being emitted, one being assembled and `prefetch_rounds` being read.
    The other half of the budget is left for side arrays, Python and torch. A round is also
    capped at MAX_ROUND_CELLS per rank: its first batch waits for the whole round to be read, so
    this bounds the time to the first batch after a (re)start; `max_chunks` (the stream passes
    full chunks // W) keeps at least one full round when the data allow. K is a multiple of
    micro_batch / gcd(micro_batch, C), so K*C is a multiple of the micro-batch.
    """
    bytes_per_chunk = BYTES_PER_NNZ * max(mean_nnz, 1.0) * chunk_cells + 64 * chunk_cells
    k = int(0.5 * budget_gb * 1e9 / ((prefetch_rounds + 2) * bytes_per_chunk))
    k = min(k, MAX_ROUND_CELLS // chunk_cells, max_chunks or k)
    step = micro_batch // math.gcd(micro_batch, chunk_cells)
    return max(step, k // step * step)


def auto_chunk_cells(config: DataConfig, num_cells: int, world_size: int) -> int:
    """Return C: the configured or default chunk length, lowered in direct mode for small N/W.

    Only a fully derived direct-mode layout adapts (chunk_cells = chunks_per_rank_round = 0):
    the default halves until each rank gets MIN_RANK_CHUNKS chunks per epoch
    (MIN_SINGLE_RANK_CHUNKS when world_size is 1). A training copy is pre-shuffled, so its chunks
    are random cells and their length does not matter for mixing.
    """
    C = config.effective_chunk_cells
    if config.mode != "direct" or config.chunk_cells or config.chunks_per_rank_round:
        return C
    least = MIN_SINGLE_RANK_CHUNKS if world_size == 1 else MIN_RANK_CHUNKS
    while C > 1 and num_cells // C // world_size < least:
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
            mean_nnz,
            C,
            config.micro_batch,
            config.memory_budget_gb,
            config.prefetch_rounds,
            max_chunks=num_cells // C // world_size,
        )
    return C, K

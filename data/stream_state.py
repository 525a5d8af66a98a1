"""The stream's saved position (docs/contracts.md §2.1, `state_dict()`): its format and checks.

Design: docs/loader.md, "Positions, resume and elastic resume".

A position is a plain dict, the same on every rank: the sampler's layout, the epoch, its
restarts and the batches consumed in the current segment, plus the data fingerprint and seed
that it is only valid for.
"""

from __future__ import annotations

from typing import Any

from atlasldm.data.sampler import LockstepSampler, Restart

FORMAT_VERSION = 2  # 2: rank-contiguous layout, per-epoch C, restarts (1: global rounds)


def position_state(
    sampler: LockstepSampler,
    fingerprint: str,
    epoch: int,
    restarts: tuple[Restart, ...],
    batch: int,
) -> dict[str, Any]:
    """Return the position after `batch` batches of the segment of `epoch` after `restarts`."""
    round_index, micro = sampler.locate(restarts, batch)
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "seed": sampler.seed,
        "epoch": epoch,
        "C": sampler.chunk_cells,
        "restarts": [[r.world_size, r.chunks_per_rank, r.round, r.skip] for r in restarts],
        "batch_in_epoch": batch,
        "round": round_index,
        "microbatch_in_round": micro,
        "world_size": sampler.world_size,
        "K": sampler.chunks_per_rank,
        "micro_batch": sampler.micro_batch,
        "drop_last": sampler.drop_last,
    }


def saved_restarts(state: dict[str, Any]) -> tuple[Restart, ...]:
    """The restarts of a format-2 position."""
    return tuple(Restart(*r) for r in state["restarts"])


def same_layout(state: dict[str, Any], sampler: LockstepSampler) -> bool:
    """Whether the position was saved under `sampler`'s W, K, micro-batch and drop_last."""
    saved = (state["world_size"], state["K"], state["micro_batch"], state["drop_last"])
    now = (sampler.world_size, sampler.chunks_per_rank, sampler.micro_batch, sampler.drop_last)
    return saved == now


def saved_sampler(state: dict[str, Any], num_cells: int) -> LockstepSampler:
    """A sampler with the layout the position was saved under (rank 0 of it)."""
    return LockstepSampler(
        num_rows=num_cells,
        chunk_cells=state["C"],
        chunks_per_rank=state["K"],
        micro_batch=state["micro_batch"],
        world_size=state["world_size"],
        rank=0,
        seed=state["seed"],
        drop_last=state["drop_last"],
    )


def check_state(state: dict[str, Any], fingerprint: str, seed: int) -> None:
    """Refuse a position of another format, other data or another seed, saying what to do."""
    if state.get("format_version") not in (1, FORMAT_VERSION):
        raise ValueError(
            f"loader state format_version={state.get('format_version')} is not "
            f"{FORMAT_VERSION}; this checkpoint was written by another loader version"
        )
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"loader state belongs to other data (fingerprint {state['fingerprint'][:12]} != "
            f"{fingerprint[:12]}): the copy, query, split, min/max_genes or chunk_cells "
            "changed; resume with the original data config or start a new run"
        )
    if state["seed"] != seed:
        raise ValueError(
            f"loader state has seed={state['seed']} but the config has "
            f"seed={seed}; restore the original value"
        )

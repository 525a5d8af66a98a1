"""Hash-based validation split, stable across world sizes, appends and modes.

Design: docs/loader.md, "Validation split and evaluation order".

A cell is in validation when `splitmix64(seed' ^ hash(key)) / 2^64 < val_fraction`, where
`seed' = splitmix64(seed)` and `hash` is splitmix64 for integer keys (soma_joinid; on a training
copy the source joinid, so the assignment survives re-ingest orders and appends) or an 8-byte
blake2b digest for string keys (donor_id, dataset_id: whole donors or datasets are held out).
The assignment of a cell depends on its key and the seed only, never on N, W or the order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import numpy as np

Split = Literal["train", "val", "all"]
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


MASK_BLOCK = 1 << 20  # cells per block of the split computation


def splitmix64(x: np.ndarray | int) -> np.ndarray:
    """Return splitmix64 of uint64 values (vectorized, wrapping arithmetic), same shape."""
    z = np.asarray(x).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_strings(values: Sequence[str]) -> np.ndarray:
    """Return a stable uint64 hash per string (blake2b, 8 bytes, little endian), shape (n,)."""
    return np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(str(v).encode("utf-8"), digest_size=8).digest(), "little"
            )
            for v in values
        ),
        dtype=np.uint64,
        count=len(values),
    )


def hash_int_keys(keys: np.ndarray) -> np.ndarray:
    """Return the uint64 hash of integer keys (e.g. joinids), shape as `keys`."""
    return splitmix64(np.asarray(keys, dtype=np.int64).view(np.uint64))


def hash_coded_strings(codes: np.ndarray, values: Sequence[str]) -> np.ndarray:
    """Hash label codes through their string values (code == len(values) is null -> "")."""
    table = hash_strings([*values, ""])
    return table[np.asarray(codes, dtype=np.int64)]


def val_mask(key_hashes: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    """Return a bool mask (n,), True where the cell belongs to the validation split."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    keys = np.asarray(key_hashes, dtype=np.uint64)
    salt = splitmix64(np.uint64(seed))
    out = np.empty(len(keys), dtype=bool)
    for lo in range(0, len(keys), MASK_BLOCK):  # bounded temporaries at any corpus size
        mixed = splitmix64(keys[lo : lo + MASK_BLOCK] ^ salt)
        # Top 53 bits -> a float in [0, 1) exactly representable: a portable comparison.
        uniform = (mixed >> np.uint64(11)).astype(np.float64) * (2.0**-53)
        out[lo : lo + MASK_BLOCK] = uniform < val_fraction
    return out


def split_mask(key_hashes: np.ndarray, seed: int, val_fraction: float, split: Split) -> np.ndarray:
    """Return the bool mask (n,) of cells in `split` ("train", "val" or "all")."""
    if split == "all":
        return np.ones(len(key_hashes), dtype=bool)
    is_val = val_mask(key_hashes, seed, val_fraction)
    if split == "val":
        return is_val
    if split == "train":
        return ~is_val
    raise ValueError(f"split={split!r} must be 'train', 'val' or 'all'")

"""The loader benchmark's diversity measure: per-batch entropy against random sampling."""

import numpy as np

from atlasldm.data.benchmark import batch_entropy, random_entropy


def test_batch_entropy_closed_forms() -> None:
    assert batch_entropy(np.zeros(64, dtype=int)) == 0.0
    assert np.isclose(batch_entropy(np.repeat(np.arange(4), 16)), np.log(4))


def test_random_entropy_orders_shuffled_above_grouped() -> None:
    """Contiguous dataset blocks (Census order) are far less diverse than random batches."""
    codes = np.repeat(np.arange(10), 1000)
    grouped = np.mean([batch_entropy(codes[i : i + 100]) for i in range(0, len(codes), 100)])
    rand = random_entropy(codes, 100, draws=200)
    assert grouped < 0.1 * rand
    assert rand > 0.9 * np.log(10)

"""Condition vocabularies of a set of exports, and the codes the networks take.

The VAE export's `labels.json` (the training copy's label vocabularies) is the reference; the
denoiser's and classifiers' vocabularies must equal it for their attributes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ConditionError(ValueError):
    """A generation request names an unknown attribute or value, or is malformed."""


class Vocabulary:
    """Attribute -> ordered values; the code of a value is its index, the null code is len."""

    def __init__(self, labels: dict[str, list[str]]) -> None:
        self.labels = {a: list(v) for a, v in labels.items()}

    def values(self, attr: str) -> list[str]:
        """Return the values of `attr`; raises ConditionError naming the known attributes."""
        if attr not in self.labels:
            raise ConditionError(
                f"unknown condition attribute {attr!r}; the exports know {sorted(self.labels)}"
            )
        return self.labels[attr]

    def check_value(self, attr: str, value: str) -> str:
        """Return `value` if `attr` has it; raises ConditionError listing the valid values."""
        known = self.values(attr)
        if value not in known:
            raise ConditionError(
                f"unknown value {value!r} for condition {attr!r}; valid values: {known}"
            )
        return value

    def codes(self, attr: str, values: Sequence[str]) -> np.ndarray:
        """Return int64 codes (n,) of `values` (unknown or unset values get the null code)."""
        index = {v: i for i, v in enumerate(self.values(attr))}
        null = len(index)
        return np.array([index.get(v, null) for v in values], dtype=np.int64)

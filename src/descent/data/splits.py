"""Splits: pure functions from labels (and attributes) to index arrays, all through scikit-learn's splitters.

Nothing here reads images: a split of 5 million samples needs only their labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Split:
    """Sorted, disjoint integer indices into a source."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def save(self, path: Path) -> None:
        np.savez(path, train=self.train, val=self.val, test=self.test)

    @classmethod
    def load(cls, path: Path) -> Split:
        with np.load(path) as arrays:
            return cls(arrays["train"], arrays["val"], arrays["test"])


def train_val_test(strata: np.ndarray, fractions: tuple[float, float, float], seed: int) -> Split:
    """A stratified train/val/test split: test first, then val out of the rest, both from the seed."""
    from sklearn.model_selection import train_test_split

    _, val_fraction, test_fraction = fractions
    everything = np.arange(len(strata))
    rest, test = train_test_split(everything, test_size=test_fraction, stratify=strata, random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=strata[rest], random_state=seed
    )
    return Split(np.sort(train), np.sort(val), np.sort(test))

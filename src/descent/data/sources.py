"""Data sources: labelled images as arrays, read from where they live. A source never splits nor batches.

Every source gives `images` (N, ...) of any numeric dtype, possibly memory-mapped, `labels` (N,) int64 and an
optional `metadata` table of N rows (one column per attribute, for stratification and groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig

from descent.config import ConfigError

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class Source:
    """Labelled images, in the order the split indices refer to."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    metadata: pd.DataFrame | None = None

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def column(self, name: str) -> np.ndarray:
        """`label` or a metadata column, as an array of N values."""
        if name == "label":
            return self.labels
        if self.metadata is None or name not in self.metadata.columns:
            known = ["label", *([] if self.metadata is None else list(self.metadata.columns))]
            raise ConfigError("data.stratify_by/group_by", name, f"expected one of the columns {known}")
        return self.metadata[name].to_numpy()


def load_digits() -> Source:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), nothing downloaded."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return Source("digits", bunch.images.astype(np.float32), bunch.target.astype(np.int64))


SOURCES: dict[str, Any] = {"digits": lambda cfg: load_digits()}


def build_source(cfg: DictConfig) -> Source:
    """The source named by `data.name`."""
    if cfg.name not in SOURCES:
        raise ConfigError("data.name", cfg.name, f"expected one of {sorted(SOURCES)}")
    return SOURCES[cfg.name](cfg)

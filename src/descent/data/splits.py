"""Splits: pure functions from labels, attributes and groups to index arrays, all through scikit-learn's splitters.

Nothing here reads images: a split of 5 million samples needs only their labels (seconds). Strata too small to be
split are merged by `strata` (rule in its docstring) or refused by name; scikit-learn's own "least populated class"
error never reaches the user. Nothing here ever drops a sample: every index lands in exactly one part.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from descent.config import ConfigError

log = logging.getLogger("descent")


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


class SmallStratum(ValueError):
    """A value of the anchor column (the label) with fewer samples than a split needs, even after merging."""

    def __init__(self, name: str, count: int, needed: int) -> None:
        self.name, self.count, self.needed = name, count, needed
        super().__init__(f"the stratum {name} has {count} samples")


def strata(columns: dict[str, np.ndarray], needed: int) -> np.ndarray:
    """Integer stratum codes: the joint key of `columns`, each stratum with at least `needed` samples.

    Merging rule: the anchor is `label` when listed, else the first column. A joint stratum with fewer than `needed`
    samples loses its attributes but keeps its anchor: the small strata of one anchor value are pooled into one
    stratum; if that pool is still too small it joins the largest full stratum of the same anchor value. An anchor
    value with fewer than `needed` samples in all raises `SmallStratum` (the label is never merged away).
    """
    import pandas as pd

    names = list(columns)
    anchor = "label" if "label" in columns else names[0]
    frame = pd.DataFrame(columns)
    joint = frame.groupby(names, sort=True, dropna=False).ngroup().to_numpy()
    anchor_codes, anchor_values = pd.factorize(frame[anchor], sort=True)
    anchor_counts = np.bincount(anchor_codes)
    if anchor_counts.min() < needed:
        smallest = int(np.argmin(anchor_counts))
        raise SmallStratum(f"{anchor}={anchor_values[smallest]}", int(anchor_counts[smallest]), needed)

    small = np.bincount(joint)[joint] < needed
    if not small.any():
        return joint
    pooled = np.where(small, joint.max() + 1 + anchor_codes, joint)
    pool_counts = np.bincount(pooled)
    for code in np.unique(anchor_codes[small]):
        pool = joint.max() + 1 + code
        if pool_counts[pool] >= needed:
            continue
        full = pooled[(anchor_codes == code) & ~small]  # non-empty: the anchor value has >= needed samples
        pooled[pooled == pool] = np.bincount(full).argmax()
    log.info(
        "data.stratify_by=%s: %d samples in strata of fewer than %d were pooled by %s (the merging rule of "
        "descent.data.splits.strata)",
        names,
        int(small.sum()),
        needed,
        anchor,
    )
    return pd.factorize(pooled)[0]


def needed_per_stratum(fractions: tuple[float, float, float], folds: int = 0) -> int:
    """Samples a stratum needs so that each part gets one: 1/smallest fraction for a split (5 for 60/20/20); for k
    folds, at least k, and enough that each fold's rest still gives val one (5 for 5 folds of 60/20/20, 6 for 3)."""
    train, val, _ = fractions
    if not folds:
        return math.ceil(1 / min(fractions) - 1e-9)
    inner = math.ceil(1 / min(val / (train + val), train / (train + val)) - 1e-9)
    return max(folds, math.ceil(inner * folds / (folds - 1) - 1e-9))


def _parts_of(fraction: float) -> int:
    """The k whose 1/k is closest to `fraction`: group-aware splits take one of k group folds."""
    return max(2, round(1 / fraction))


def _check_groups(groups: np.ndarray, parts: int, key: str, value: object, what: str) -> None:
    count = len(np.unique(groups))
    if count < parts:
        raise ConfigError(key, value, f"data.group_by has {count} groups, and {what} needs at least {parts}")


def _hold_out(
    indices: np.ndarray, strata: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held out): a stratified `fraction` of `indices`; with groups, one of round(1/fraction) group folds."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    if groups is None:
        rest, held = train_test_split(indices, test_size=fraction, stratify=strata, random_state=seed)
        return rest, held
    splitter = StratifiedGroupKFold(_parts_of(fraction), shuffle=True, random_state=seed)
    rest, held = next(splitter.split(indices, strata, groups))
    return indices[rest], indices[held]


def train_val_test(
    strata: np.ndarray, fractions: tuple[float, float, float], seed: int, groups: np.ndarray | None = None
) -> Split:
    """A stratified train/val/test split: test first, then val out of the rest, both from the seed.

    With `groups`, no group is in two parts: test is one of round(1/test) stratified group folds, val one of
    round((train+val)/val) group folds of the rest, so fractions are those of the nearest 1/k (0.2 -> 1/5).
    """
    _, val, test = fractions
    if groups is not None:
        _check_groups(groups, _parts_of(test), "data.split", list(fractions), "this split")
    everything = np.arange(len(strata))
    rest, test_part = _hold_out(everything, strata, test, seed, groups)
    if groups is not None:
        _check_groups(groups[rest], _parts_of(val / (1 - test)), "data.split", list(fractions), "its val part")
    train, val_part = _hold_out(rest, strata[rest], val / (1 - test), seed, None if groups is None else groups[rest])
    return Split(np.sort(train), np.sort(val_part), np.sort(test_part))


def with_test(
    strata: np.ndarray,
    fractions: tuple[float, float, float],
    seed: int,
    test: np.ndarray,
    groups: np.ndarray | None = None,
) -> Split:
    """A split whose test part is given (a data set's official test set): val is a stratified val/(train+val) share
    of the rest (by group when given), train the remainder."""
    train, val, _ = fractions
    rest = np.setdiff1d(np.arange(len(strata)), test)
    if groups is not None:
        _check_groups(groups[rest], _parts_of(val / (train + val)), "data.split", list(fractions), "its val part")
    fit, val_part = _hold_out(rest, strata[rest], val / (train + val), seed, None if groups is None else groups[rest])
    return Split(np.sort(fit), np.sort(val_part), np.sort(test))


def k_fold(
    strata: np.ndarray,
    fractions: tuple[float, float, float],
    folds: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> list[Split]:
    """k splits whose test parts partition the samples (stratified, by group when given): fold i's test set is
    part i, and its val set a stratified val/(train+val) share of the other parts."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    train, val, _ = fractions
    everything = np.arange(len(strata))
    if groups is None:
        parts = StratifiedKFold(folds, shuffle=True, random_state=seed).split(everything, strata)
    else:
        _check_groups(groups, folds, "cv.folds", folds, f"cv.folds={folds}")
        parts = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(everything, strata, groups)
    splits = []
    for rest, test_part in parts:
        rest_groups = None if groups is None else groups[rest]
        if rest_groups is not None:
            _check_groups(rest_groups, _parts_of(val / (train + val)), "data.split", list(fractions), "its val part")
        fit, val_part = _hold_out(rest, strata[rest], val / (train + val), seed, rest_groups)
        splits.append(Split(np.sort(fit), np.sort(val_part), np.sort(test_part)))
    return splits


def make_splits(
    size: int,
    columns: dict[str, np.ndarray],
    fractions: tuple[float, float, float],
    seed: int,
    folds: int = 0,
    groups: np.ndarray | None = None,
    test: np.ndarray | None = None,
) -> list[Split]:
    """One train/val/test split (`folds=0`; with `test`, that test part), or the k splits of k-fold cross-validation
    of `size` samples, stratified on the joint key of `columns` (none: one stratum), refusing strata too small by
    name. `seed` is the split's own (data.split_seed): the runs of other seeds share the split."""
    needed = needed_per_stratum(fractions, folds)
    try:
        codes = strata(columns, needed) if columns else np.zeros(size, dtype=np.int64)
    except SmallStratum as small:
        key, value = ("cv.folds", folds) if folds else ("data.stratify_by", list(columns))
        what = f"{folds} folds with data.split={list(fractions)}" if folds else f"data.split={list(fractions)}"
        raise ConfigError(
            key,
            value,
            f"{small}: {what} needs at least {needed} samples in every stratum "
            "(every fold and part gets one); use fewer folds or drop columns from data.stratify_by",
        ) from None
    if folds:
        return k_fold(codes, fractions, folds, seed, groups)
    if test is not None:
        return [with_test(codes, fractions, seed, test, groups)]
    return [train_val_test(codes, fractions, seed, groups)]

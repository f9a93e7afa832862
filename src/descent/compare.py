"""A sweep's answer: the replicates of each setting turned into a mean with its 95% interval, a paired test of each
setting against the best, Holm-adjusted p-values and a verdict (`best`, `tied`, `worse`), and one sentence.

Pure functions over numbers: this module never reads or writes a file, and never chooses the best on a test metric.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

NOT_SETTING: tuple[str, ...] = ("seed", "cv.fold", "skip_done", "ckpt_path", "hydra.*", "hydra/*")
METRICS: tuple[str, ...] = ("val/acc", "test/acc", "test/loss", "to_target/seconds", "to_target/steps")
PAIRED_BY = ("seed", "fold")
_PREFIX = re.compile(r"^(\+\+|\+|~)")  # Hydra's append, force-add and delete markers


def _key(override: str) -> str:
    return _PREFIX.sub("", override).split("=", 1)[0]


def setting_of(overrides: Sequence[str]) -> tuple[str, ...]:
    """The overrides that define a setting ("key=value" strings, as typed), without NOT_SETTING keys; a leading
    "+", "++" or "~" is ignored when matching keys; order kept."""
    return tuple(o for o in overrides if not any(fnmatch.fnmatchcase(_key(o), k) for k in NOT_SETTING))


@dataclass(frozen=True)
class Replicate:
    """One finished run of a setting: its metrics, and the key (seed or fold) that pairs it across settings."""

    setting: tuple[str, ...]
    key: int | str
    paired_by: str
    metrics: Mapping[str, float | None]  # None or NaN = missing (e.g. a target never reached)
    n_train: int | None = None  # the fold's training size (Nadeau-Bengio)
    n_test: int | None = None  # the fold's test size

    def __post_init__(self) -> None:
        if self.paired_by not in PAIRED_BY:
            raise ValueError(f"paired_by={self.paired_by!r}: expected one of {PAIRED_BY}")
        if self.paired_by == "fold" and not (self.n_train and self.n_test and self.n_train > 0 and self.n_test > 0):
            raise ValueError(
                f"fold {self.key} of {self.setting}: n_train={self.n_train} n_test={self.n_test}, expected positive "
                "sizes (the Nadeau-Bengio correction needs them)"
            )

    def value(self, name: str) -> float | None:
        """The metric as a finite float, or None when missing."""
        v = self.metrics.get(name)
        return float(v) if v is not None and math.isfinite(v) else None


@dataclass(frozen=True)
class Interval:
    """A mean over n values, their std (ddof=1) and the interval of the mean; None where n is too small."""

    n: int
    mean: float | None
    std: float | None
    low: float | None
    high: float | None


def _finite(values: Sequence[float | None]) -> np.ndarray:
    return np.array([float(v) for v in values if v is not None and math.isfinite(v)], dtype=float)


def interval(values: Sequence[float | None], confidence: float = 0.95, correction: float = 0.0) -> Interval:
    """Student-t interval of the mean over the finite values: mean +- t_{(1+c)/2, n-1} * sqrt(var * (1/n + correction)),
    var with ddof=1. correction = n_test/n_train for CV folds (Nadeau & Bengio 2003), 0 for seeds. n < 2: no std, no
    interval (None)."""
    x = _finite(values)
    n = len(x)
    if n < 2:
        return Interval(n, float(x[0]) if n else None, None, None, None)
    mean, std = float(np.mean(x)), float(np.std(x, ddof=1))
    scale = std * math.sqrt(1 / n + correction)
    if scale == 0:
        return Interval(n, mean, std, mean, mean)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=scale)
    return Interval(n, mean, std, float(low), float(high))


def _rounding(a: np.ndarray, b: np.ndarray) -> float:
    """How far apart floats of this size can be from rounding alone (0.8 - 0.9 and 0.82 - 0.92 differ in the last
    bits): below it a spread is treated as none, where scipy would warn of catastrophic cancellation."""
    return 4 * np.finfo(float).eps * float(max(np.abs(a).max(), np.abs(b).max()))


def paired_p(a: Sequence[float], b: Sequence[float], correction: float = 0.0) -> float:
    """Two-sided p of the paired t-test of a - b (correction 0: exactly scipy.stats.ttest_rel's p; with correction: the
    Nadeau-Bengio corrected resampled t-test, variance of the mean d = var(d) * (1/n + correction), df = n-1).
    Every difference 0 -> 1.0 (scipy returns NaN there). Constant non-zero difference -> 0.0."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or len(a) < 2:
        raise ValueError(f"paired_p: expected two samples of the same length >= 2, got {len(a)} and {len(b)}")
    d = a - b
    rounding = _rounding(a, b)
    if np.all(np.abs(d) <= rounding):
        return 1.0
    if np.ptp(d) <= rounding:
        return 0.0
    result = stats.ttest_rel(a, b)
    if correction == 0:
        return float(result.pvalue)
    # ttest_rel's t has variance var(d)/n; the corrected one var(d) * (1/n + correction)
    t = result.statistic / math.sqrt(1 + len(d) * correction)
    return float(2 * stats.t.sf(abs(t), len(d) - 1))


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Welch's t-test (scipy.stats.ttest_ind(equal_var=False)); both samples constant: 1.0 if equal means else 0.0."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"welch_p: expected two samples of size >= 2, got {len(a)} and {len(b)}")
    rounding = _rounding(a, b)
    if np.ptp(a) <= rounding and np.ptp(b) <= rounding:
        return 1.0 if abs(a.mean() - b.mean()) <= rounding else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order, monotone, capped at 1."""
    # by hand: scipy has no Holm (only false_discovery_control's BH/BY)
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return [float(v) for v in adjusted]


def _lower_is_better(metric: str) -> bool:
    """A loss, or a time or step count to reach the target, is minimized."""
    return "loss" in metric or metric.startswith("to_target/")


def _correction(replicates: Sequence[Replicate]) -> float:
    """Nadeau-Bengio's n_test/n_train, averaged over the folds among these replicates (0 for seeds)."""
    ratios = [r.n_test / r.n_train for r in replicates if r.paired_by == "fold"]
    return float(np.mean(ratios)) if ratios else 0.0


def _test(best: Sequence[Replicate], other: Sequence[Replicate], metric: str) -> tuple[str, float]:
    """(how, raw p) of `other` against `best`: paired over the same keys when both have the same unique keys and the
    same kind of pairing, else Welch."""
    a = [r for r in best if r.value(metric) is not None]
    b = [r for r in other if r.value(metric) is not None]
    by_a, by_b = {r.key: r for r in a}, {r.key: r for r in b}
    kinds = {r.paired_by for r in (*a, *b)}
    if len(kinds) == 1 and len(by_a) == len(a) and len(by_b) == len(b) and by_a.keys() == by_b.keys():
        keys = list(by_a)
        pairs = [by_a[k] for k in keys] + [by_b[k] for k in keys]
        p = paired_p([by_b[k].value(metric) for k in keys], [by_a[k].value(metric) for k in keys], _correction(pairs))
        return kinds.pop(), p
    return "welch", welch_p([r.value(metric) for r in b], [r.value(metric) for r in a])


def compare(
    replicates: Sequence[Replicate],
    metric: str = "val/acc",
    alpha: float = 0.05,
    metrics: Sequence[str] = METRICS,
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """One row per setting, best first then by mean of `metric`: its label, n, mean/std/interval of every metric,
    `to_target/*` reached counts, and its verdict against the best (paired or Welch t-test, Holm-adjusted p)."""
    if metric.startswith("test/"):
        raise ValueError(f"compare.metric={metric}: the best is never chosen on test/*; expected a val/* metric")
    groups: dict[tuple[str, ...], list[Replicate]] = {}
    for replicate in replicates:
        groups.setdefault(replicate.setting, []).append(replicate)
    names = labels(list(groups))
    rows = []
    for setting, group in groups.items():
        row: dict[str, Any] = {"setting": setting, "label": names[setting]}
        row["n"] = sum(r.value(metric) is not None for r in group)
        correction = _correction(group)
        for name in dict.fromkeys((*metrics, metric)):
            summary = interval([r.value(name) for r in group], confidence, correction)
            row[f"{name}_mean"], row[f"{name}_std"] = summary.mean, summary.std
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = summary.low, summary.high
            if name.startswith("to_target/"):
                row[f"{name}_reached"] = summary.n
        row |= {"paired_by": None, "verdict": None, "p_value": None, "p_raw": None}
        rows.append(row)

    sign = 1 if _lower_is_better(metric) else -1
    rows.sort(key=lambda r: (r["n"] == 0, 0.0 if r["n"] == 0 else sign * r[f"{metric}_mean"]))
    if not rows or rows[0]["n"] == 0:
        for row in rows:
            row["verdict"] = "cannot be tested (n=0)"
        return rows
    best, others = rows[0], rows[1:]
    best["verdict"] = "best"
    tested = []
    for row in others:
        if row["n"] < 2 or best["n"] < 2:
            row["verdict"] = f"cannot be tested (n={min(row['n'], best['n'])})"
            continue
        row["paired_by"], row["p_raw"] = _test(groups[best["setting"]], groups[row["setting"]], metric)
        tested.append(row)
    for row, p in zip(tested, holm([row["p_raw"] for row in tested]), strict=True):
        row["p_value"] = p
        row["verdict"] = "worse" if p < alpha else "tied"
    return rows


def _parse(override: str) -> tuple[str, str]:
    """(key, what to show for it): the value after "=", or the override as typed when it has none (a "~key")."""
    key = _key(override)
    return key, override.split("=", 1)[1] if "=" in override else override


def labels(settings: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """A short name per setting: with one key varying between settings, its value ("adam") for a config group, its last
    part and value ("batch_size=32") for a key; with several, "k=v k=v" of the varying keys; with one setting, its
    overrides joined or "(defaults)"."""
    settings = list(dict.fromkeys(settings))
    joined = [" ".join(s) or "(defaults)" for s in settings]
    if len(settings) < 2:
        return dict(zip(settings, joined, strict=True))
    parsed = [dict(_parse(o) for o in s) for s in settings]
    keys = dict.fromkeys(k for p in parsed for k in p)
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    if len(varying) == 1:  # a group's choice by its name ("adam"), a key by its last part ("batch_size=32")
        key = varying[0]
        short = key.rsplit(".", 1)[-1]
        names = ["(defaults)" if key not in p else p[key] if key == short else f"{short}={p[key]}" for p in parsed]
    else:
        names = [" ".join(f"{k}={p[k]}" for k in varying if k in p) or "(defaults)" for p in parsed]
    if len(set(names)) < len(names):  # settings that differ only in how a key was typed ("+k=1" and "k=1")
        names = joined
    return dict(zip(settings, names, strict=True))


def estimate(mean: float, low: float | None, high: float | None) -> str:
    """The estimate as "0.987 ± 0.004": the half-width to one significant digit, the mean to the same decimal place."""
    if low is None or high is None:
        return f"{mean:.3g}"
    half = float(f"{(high - low) / 2:.1g}")
    if half == 0:
        return f"{mean:.3g} ± 0"
    places = -math.floor(math.log10(half))
    if places > 0:
        return f"{mean:.{places}f} ± {half:.{places}f}"
    return f"{round(mean, places):.0f} ± {half:.0f}"


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def answer(rows: list[dict[str, Any]], metric: str = "val/acc", confidence: float = 0.95) -> str:
    """One sentence over the settings of `compare`, e.g. "adam 0.987 ± 0.004 val/acc (95% CI, n=3): best; momentum
    0.985 ± 0.006: tied (p=0.41); sgd 0.72 ± 0.05: worse (p=0.003)." (± is the interval's half-width). n=1: "sgd 0.72
    (n=1): cannot be tested (n=1)". A tied setting is only ever called tied, never better or worse."""
    clauses, said_n = [], None
    for i, row in enumerate(rows):
        mean, low, high = row[f"{metric}_mean"], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
        text = row["label"] if mean is None else f"{row['label']} {estimate(mean, low, high)}"
        if i == 0:
            text += f" {metric}"
        if low is None:
            text += f" (n={row['n']})"
        elif said_n is None:
            text += f" ({confidence * 100:g}% CI, n={row['n']})"
            said_n = row["n"]
        elif row["n"] != said_n:
            text += f" (n={row['n']})"
        verdict = row["verdict"] if row["p_value"] is None else f"{row['verdict']} ({_p(row['p_value'])})"
        clauses.append(f"{text}: {verdict}")
    return "; ".join(clauses) + "." if clauses else ""

"""The pictures: matplotlib figures (Agg backend, files only) for runs, CV runs, sweeps and the course's figures.

Each function draws one figure from numbers it is given and writes one PNG with a title, axis labels and a legend.
Imported lazily (matplotlib takes a while to import): training only pays for it after its test. Nothing here reads
run folders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110
LINE_STYLES = ("-", "--", ":", "-.")
MAX_ANNOTATED_CLASSES = 30  # above, counts and ticks would overlap: the colours alone tell


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def subplots(*grid: int, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    """A figure and its axes, as `pyplot.subplots` gives them, without pyplot: a Figure of matplotlib's object API
    draws with the Agg canvas, registers with no GUI backend and is freed with its last reference."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*grid, **kwargs)


def save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def ewa(values: Sequence[float], b: float, bias_correction: bool = True) -> np.ndarray:
    """The course's exponentially weighted average v_t = b v_{t-1} + (1 - b) y_t from v_0 = 0, divided by
    (1 - b^t) when bias-corrected (so the first values are not pulled towards 0). Written by hand: pandas' ewm
    with adjust=True equals it but hides the formula the course teaches."""
    averages = np.empty(len(values))
    v = 0.0
    for t, y in enumerate(values, start=1):
        v = b * v + (1 - b) * y
        averages[t - 1] = v / (1 - b**t) if bias_correction else v
    return averages


def confusion_matrix(matrix: np.ndarray, path: Path, title: str = "Test confusion matrix") -> Path:
    """Counts per (true, predicted) class, darker for more; each cell shows its count (up to 30 classes)."""
    return confusion_matrices([matrix], [path], title)[0]


def confusion_matrices(
    matrices: Sequence[np.ndarray], paths: Sequence[Path], title: str = "Test confusion matrix"
) -> list[Path]:
    """One confusion_matrix figure for each of several matrices of the same classes (the replicates of a run), drawn
    as one figure whose image, counts and title are updated for each: its layout is computed once, not per file."""
    first = np.asarray(matrices[0])
    n = len(first)
    side = min(16.0, 1.5 + 0.5 * n)
    figure, axis = subplots(figsize=(side + 1.0, side))
    image = axis.imshow(first, cmap="Blues")
    counts = []
    if n <= MAX_ANNOTATED_CLASSES:
        counts = [axis.text(column, row, "", ha="center", va="center", fontsize=8) for row, column in np.ndindex(n, n)]
        axis.set(xticks=range(n), yticks=range(n))
    axis.set(xlabel="predicted class", ylabel="true class")
    figure.colorbar(image, ax=axis, label="samples", fraction=0.046)
    for index, (matrix, path) in enumerate(zip(matrices, paths, strict=True)):
        matrix = np.asarray(matrix)
        image.set_data(matrix)
        image.set_clim(matrix.min(), matrix.max())
        threshold = matrix.max() / 2 if matrix.size else 0
        for text, count in zip(counts, matrix.flat, strict=False):
            text.set_text(str(int(count)))
            text.set_color("white" if count > threshold else "black")
        accuracy = np.trace(matrix) / matrix.sum() if matrix.sum() else float("nan")
        axis.set_title(f"{title} (acc {accuracy:.3f}, n={int(matrix.sum())})")
        if index == 0:
            figure.tight_layout()
        figure.savefig(path, dpi=DPI)
    return list(paths)


def learning_curves(
    epochs: Mapping[str, Sequence[float]],
    steps: Sequence[float] | None,
    step_losses: Sequence[float] | None,
    b: float,
    path: Path,
    title: str,
) -> Path:
    """Loss and accuracy per epoch (train and val) on the left and middle; the per-step training loss, raw and
    smoothed by the bias-corrected exponentially weighted average, on the right."""
    has_steps = steps is not None and len(steps) > 0
    figure, axes = subplots(1, 3 if has_steps else 2, figsize=(15 if has_steps else 10, 4))
    for axis, metric in zip(axes[:2], ("loss", "acc"), strict=True):
        for stage, style in (("train", "-o"), ("val", "-s")):
            key = f"{stage}/{metric}"
            if key in epochs:
                axis.plot(epochs["epoch"], epochs[key], style, markersize=3, label=stage)
        axis.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend()
        axis.grid(alpha=0.3)
    if has_steps:
        axis = axes[2]
        axis.plot(steps, step_losses, color="0.75", linewidth=0.8, label="train loss per step")
        axis.plot(steps, ewa(step_losses, b), color="C3", label=f"EWA, b={b}, bias-corrected")
        axis.set(xlabel="optimizer step", ylabel="training loss", title="training loss per step")
        axis.set_yscale("log")
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    return save(figure, path)


def fold_curves(folds: Mapping[str, Mapping[str, Sequence[float]]], path: Path, title: str) -> Path:
    """Validation loss and accuracy per epoch, one line per fold."""
    figure, axes = subplots(1, 2, figsize=(11, 4))
    for axis, metric in zip(axes, ("val/loss", "val/acc"), strict=True):
        for name, rows in folds.items():
            if metric in rows:
                axis.plot(rows["epoch"], rows[metric], "-o", markersize=3, label=name)
        axis.set(xlabel="epoch", ylabel=metric, title=f"{metric} per fold")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    return save(figure, path)


def mean_std_bars(mean: Mapping[str, float], std: Mapping[str, float], path: Path, title: str) -> Path:
    """One bar per metric: the mean over folds with +- one standard deviation, scores and losses on two panels
    (their scales differ)."""
    groups = [
        (label, [n for n in mean if ("loss" in n) == is_loss])
        for label, is_loss in (("accuracy and F1 (higher is better)", False), ("loss (lower is better)", True))
    ]
    groups = [(label, names) for label, names in groups if names]
    widths = [max(2, len(names)) for _, names in groups]
    figure, axes = subplots(
        1, len(groups), figsize=(1.1 * sum(widths) + 2, 4.2), squeeze=False, gridspec_kw={"width_ratios": widths}
    )
    for axis, (label, names) in zip(axes[0], groups, strict=True):
        positions = np.arange(len(names))
        axis.bar(
            positions,
            [mean[n] for n in names],
            yerr=[std.get(n, 0.0) for n in names],
            capsize=4,
            color="C1" if "loss" in label else "C0",
            label="mean ± std over folds",
        )
        for x, name in zip(positions, names, strict=True):
            axis.annotate(
                f"{mean[name]:.3f}\n±{std.get(name, 0.0):.3f}",
                (x, mean[name] + std.get(name, 0.0)),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
            )
        axis.set_xticks(positions, names, rotation=30, ha="right")
        axis.set(ylabel="value", title=label)
        axis.margins(y=0.25)
        axis.legend(loc="lower left", fontsize=8)
    figure.suptitle(title)
    return save(figure, path)


@dataclass(frozen=True)
class SettingPoint:
    """One setting of a sweep as `settings_compared` draws it: its value of the swept key, the other swept keys'
    values (its series), its replicates' values of the metric, their mean and 95% interval, and its verdict."""

    value: object
    series: str
    values: Sequence[float]
    mean: float
    low: float | None
    high: float | None
    verdict: str


def _ordered(values: Sequence[object]) -> list[str]:
    """Distinct values as text, numbers in order, then words (data.batch_size=32,256,full)."""
    texts = {str(v) for v in values}
    return sorted(texts, key=lambda v: (not _is_float(v), float(v) if _is_float(v) else 0, v))


def settings_compared(points: Sequence[SettingPoint], key: str, metric: str, path: Path, title: str) -> Path:
    """Each setting's mean of `metric` with its 95% interval (a bar) and its replicates (dots), against the swept
    `key`, one colour per series (the other swept keys), the verdict written beside each setting."""
    figure, axis = subplots(figsize=(max(6.5, 1.3 * len(points) + 3), 4.8))
    ticks = _ordered([point.value for point in points])
    series = list(dict.fromkeys(point.series for point in points))
    width = 0.6 / max(1, len(series))
    rng = np.random.default_rng(0)  # the dots' jitter, the same at every redraw
    for index, name in enumerate(series):
        color = f"C{index % 10}"
        shift = (index - (len(series) - 1) / 2) * width
        for number, point in enumerate(p for p in points if p.series == name):
            x = ticks.index(str(point.value)) + shift
            dots = x - width / 4 + rng.uniform(-width / 10, width / 10, len(point.values))  # left of the interval
            dot_label = "replicates" if index == number == 0 else None
            axis.plot(dots, point.values, ".", color=color, alpha=0.5, markersize=6, label=dot_label)
            mean_label = (f"{name}: " if name else "") + "mean ± 95% CI" if number == 0 else None
            error = None if point.low is None else [[point.mean - point.low], [point.high - point.mean]]
            axis.errorbar(x, point.mean, yerr=error, fmt="o", color=color, capsize=5, markersize=6, label=mean_label)
            top = point.high if point.high is not None else max([point.mean, *point.values])
            axis.annotate(
                point.verdict,
                (x, top),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
                color="0.25",
            )
    axis.set_xticks(range(len(ticks)), ticks)
    axis.set_xlim(-0.6, len(ticks) - 0.4)
    axis.set(xlabel=key, ylabel=metric, title=title)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    return save(figure, path)


@dataclass(frozen=True)
class Band:
    """A curve over replicates: x, the mean of y and its standard deviation at each x, over n replicates."""

    x: Sequence[float]
    mean: Sequence[float]
    std: Sequence[float]
    n: int


def banded_curves(panels: Mapping[str, Mapping[str, Band]], path: Path, title: str, log_y: Sequence[str] = ()) -> Path:
    """One panel per entry of `panels` ("val/acc against epoch": {setting: Band}), each setting a mean line with a
    band of ±1 std over its replicates; the panels named in `log_y` on a log scale."""
    columns = min(2, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = subplots(rows, columns, figsize=(6.2 * columns, 4.2 * rows), squeeze=False)
    names = list(dict.fromkeys(name for bands in panels.values() for name in bands))
    for axis, (panel, bands) in zip(axes.flat, panels.items(), strict=False):
        for name, band in bands.items():
            color = f"C{names.index(name) % 10}"
            x, mean, std = (np.asarray(values, dtype=float) for values in (band.x, band.mean, band.std))
            axis.plot(x, mean, "-", color=color, linewidth=1.4, label=f"{name} (n={band.n})")
            if band.n > 1:
                axis.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        y_label, x_label = panel.split(" against ", 1)
        axis.set(xlabel=x_label, ylabel=y_label, title=panel)
        if x_label == "epoch":
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel in log_y:
            axis.set_yscale("log")
        if x_label != "epoch" and bands:
            ends = [band.x[-1] for band in bands.values() if len(band.x)]
            if ends and min(ends) > 0 and max(ends) / min(ends) > 20:
                axis.set_xscale("log")  # full batch against mini-batches: their step counts differ by 100x
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    return save(figure, path)


def trajectories(
    paths: Mapping[str, np.ndarray],
    loss: Callable[[np.ndarray, np.ndarray], np.ndarray],
    measurements: np.ndarray,
    bs: Sequence[float],
    path: Path,
) -> Path:
    """The course's figures: optimizer paths over the contour lines of `loss` (torch's optimizers; torch's beside
    the course's exact forms), their loss per step, and the exponentially weighted average of `measurements` for
    each b, with (solid) and without (dashed) bias correction."""
    figure, axes = subplots(2, 2, figsize=(14, 10))
    points = np.concatenate(list(paths.values()))
    x_lo, x_hi = points[:, 0].min(), points[:, 0].max()
    y_lo, y_hi = points[:, 1].min(), points[:, 1].max()
    pad_x, pad_y = 0.1 * (x_hi - x_lo), 0.2 * (y_hi - y_lo)
    grid_x, grid_y = np.meshgrid(
        np.linspace(x_lo - pad_x, x_hi + pad_x, 300), np.linspace(y_lo - pad_y, y_hi + pad_y, 300)
    )
    levels = np.geomspace(loss(points[:, :1], points[:, 1:]).max() * 1e-3, loss(grid_x, grid_y).max(), 12)
    color_of = {name: f"C{i}" for i, name in enumerate(paths)}
    panels = (
        (axes[0, 0], [n for n in paths if not n.startswith("course_")], "torch's optimizers on an elongated bowl"),
        (
            axes[0, 1],
            [n for n in paths if "rmsprop" in n or "adam" in n],
            "torch's RMSprop and Adam beside the course's",
        ),
    )
    for axis, names, title in panels:
        axis.contour(grid_x, grid_y, loss(grid_x, grid_y), levels=levels, colors="0.7", linewidths=0.7)
        for name in names:
            xy = paths[name]
            style = "--" if name.startswith("course_") else "-"
            axis.plot(
                xy[:, 0], xy[:, 1], style, marker=".", markersize=3, linewidth=1, color=color_of[name], label=name
            )
        axis.plot(*paths[names[0]][0], "ko", label="start")
        axis.plot(0, 0, "k*", markersize=12, label="minimum")
        axis.set(xlabel="w1 (flat direction)", ylabel="w2 (steep direction)", title=f"{title} ({len(xy) - 1} steps)")
        axis.legend(fontsize=8, loc="lower right")
    axis = axes[1, 0]
    for name, xy in paths.items():
        axis.plot(
            loss(xy[:, 0], xy[:, 1]), "--" if name.startswith("course_") else "-", color=color_of[name], label=name
        )
    axis.set_yscale("log")
    axis.set(xlabel="optimizer step", ylabel="loss", title="loss per step (the course's forms dashed)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    axis = axes[1, 1]
    t = np.arange(1, len(measurements) + 1)
    axis.plot(t, measurements, ".", color="0.6", markersize=4, label="measurements y_t")
    for i, b in enumerate(bs):
        axis.plot(t, ewa(measurements, b), color=f"C{i}", label=f"b={b} (~{1 / (1 - b):.0f} values), bias-corrected")
        axis.plot(
            t, ewa(measurements, b, bias_correction=False), "--", color=f"C{i}", label=f"b={b}, v_0 = 0, uncorrected"
        )
    axis.set(xlabel="t", ylabel="value", title="exponentially weighted average v_t = b v_(t-1) + (1-b) y_t")
    axis.legend(fontsize=8, loc="lower left")
    axis.grid(alpha=0.3)
    return save(figure, path)


def lr_find(
    lrs: Sequence[float], losses: Sequence[float], suggested: float, warm_up: int, path: Path, title: str
) -> Path:
    """The learning-rate finder's curve: its smoothed training loss against the lr (log axis), the first `warm_up`
    steps (the smoothing's start, which the suggestion leaves out) in grey, the suggested lr marked with a point and
    a vertical line."""
    lrs, losses = np.asarray(lrs), np.asarray(losses)
    figure, axis = subplots(figsize=(7, 4.5))
    axis.plot(
        lrs[: warm_up + 1], losses[: warm_up + 1], color="0.7", label=f"first {warm_up} steps (smoothing warm-up)"
    )
    axis.plot(lrs[warm_up:], losses[warm_up:], color="C0", label="training loss (smoothed), one step per lr")
    at = int(np.argmin(np.abs(np.log(lrs) - np.log(suggested))))
    axis.axvline(suggested, color="C3", linestyle="--", linewidth=1)
    axis.plot([lrs[at]], [losses[at]], "o", color="C3", markersize=9, label=f"suggested lr = {suggested:.3g}")
    axis.set_xscale("log")
    used = losses[warm_up:][np.isfinite(losses[warm_up:])]
    if len(used):  # the last steps can diverge by orders of magnitude: keep the descent readable
        low, high = used.min(), min(used.max(), 3 * used[0])
        axis.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
    axis.set(xlabel="learning rate (optimizer.lr)", ylabel="training loss", title=title)
    axis.legend()
    axis.grid(alpha=0.3, which="both")
    return save(figure, path)

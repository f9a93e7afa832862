"""The pictures: matplotlib figures (Agg backend, files only) for runs, CV runs, sweeps and the course's figures.

Each function draws one figure from numbers it is given and writes one PNG with a title, axis labels and a legend.
Imported lazily (matplotlib costs ~0.3 s): training only pays for it after its test. Nothing here reads run folders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
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


def save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
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
    matrix = np.asarray(matrix)
    n = len(matrix)
    side = min(16.0, 1.5 + 0.5 * n)
    figure, axis = plt.subplots(figsize=(side + 1.0, side))
    image = axis.imshow(matrix, cmap="Blues")
    if n <= MAX_ANNOTATED_CLASSES:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, column), count in np.ndenumerate(matrix):
            color = "white" if count > threshold else "black"
            axis.text(column, row, str(int(count)), ha="center", va="center", color=color, fontsize=8)
        axis.set(xticks=range(n), yticks=range(n))
    axis.set(xlabel="predicted class", ylabel="true class")
    accuracy = np.trace(matrix) / matrix.sum() if matrix.sum() else float("nan")
    axis.set_title(f"{title} (acc {accuracy:.3f}, n={int(matrix.sum())})")
    figure.colorbar(image, ax=axis, label="samples", fraction=0.046)
    return save(figure, path)


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
    figure, axes = plt.subplots(1, 3 if has_steps else 2, figsize=(15 if has_steps else 10, 4))
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
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
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
    figure, axes = plt.subplots(
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


def metric_against_key(
    values: Sequence[object], scores: Sequence[float], others: Sequence[str], key: str, metric: str, path: Path
) -> Path:
    """The best `metric` of each job against the swept `key`: a point per job, marked with the job's other swept
    values (`others`) when there are some; a line through the means when the key is numeric (log x when it spans
    more than a factor of 20)."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        positions = [float(v) for v in values]
        xs = sorted(set(positions))
        means = [np.mean([s for p, s in zip(positions, scores, strict=True) if p == x]) for x in xs]
        axis.plot(xs, means, "-", color="C1", label="mean over jobs")
        if min(xs) > 0 and max(xs) / min(xs) > 20:
            axis.set_xscale("log")
    else:
        # numbers in order, then words (data.batch_size=32,256,full)
        labels = sorted({str(v) for v in values}, key=lambda v: (not _is_float(v), float(v) if _is_float(v) else 0, v))
        positions = [labels.index(str(v)) for v in values]
        axis.set_xticks(range(len(labels)), labels, rotation=20)
        axis.margins(x=0.2)
    axis.plot(positions, scores, "o", color="C0", label="one job")
    for x, score, other in zip(positions, scores, others, strict=True):
        if other:
            axis.annotate(other, (x, score), xytext=(5, 0), textcoords="offset points", va="center", fontsize=7)
    axis.set(xlabel=key, ylabel=f"best {metric}", title=f"best {metric} against {key}")
    axis.legend()
    axis.grid(alpha=0.3)
    return save(figure, path)


def overlaid_curves(
    curves: Sequence[tuple[str, str, Mapping[str, Sequence[float]]]],
    metrics: Sequence[str],
    axes_keys: Sequence[tuple[str, str]],
    path: Path,
    title: str,
) -> Path:
    """Each metric (a row) of every job against each x axis (a column: epochs, steps, seconds). A curve is
    (colour label, style label, rows): one colour per swept value, one line style per setting of the other swept
    keys, so that every job can be told apart."""
    figure, axes = plt.subplots(
        len(metrics), len(axes_keys), figsize=(5.2 * len(axes_keys), 3.8 * len(metrics)), squeeze=False
    )
    labels = list(dict.fromkeys(label for label, _, _ in curves))
    colormap = plt.get_cmap("tab10" if len(labels) <= 10 else "viridis")
    color_of = {label: colormap(i if len(labels) <= 10 else i / (len(labels) - 1)) for i, label in enumerate(labels)}
    styles = list(dict.fromkeys(style for _, style, _ in curves))
    style_of = {style: LINE_STYLES[i % len(LINE_STYLES)] for i, style in enumerate(styles)}
    for row, metric in zip(axes, metrics, strict=True):
        for axis, (x_key, x_label) in zip(row, axes_keys, strict=True):
            shown: set[str] = set()
            for label, style, rows in curves:
                if x_key in rows and metric in rows:
                    name = f"{label}, {style}" if style else label
                    axis.plot(rows[x_key], rows[metric], style_of[style], marker="o", markersize=2.5,
                              color=color_of[label], label=None if name in shown else name)  # fmt: skip
                    shown.add(name)
            ends = [rows[x_key][-1] for _, _, rows in curves if len(rows.get(x_key, []))]
            if x_key != "epoch" and ends and min(ends) > 0 and max(ends) / min(ends) > 20:
                axis.set_xscale("log")  # full batch against mini-batches: their step counts differ by 100x
            axis.set(xlabel=x_label, ylabel=metric, title=f"{metric} against {x_label}")
            if x_key == "epoch":
                axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
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
    figure, axes = plt.subplots(2, 2, figsize=(14, 10))
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

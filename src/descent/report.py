"""Tables and plots from folders on disk: a run, a cross-validation run or a sweep -> PNGs and a report.md beside them.

It reads only files (results.json, metrics.csv, steps.csv, .hydra/overrides.yaml), so it works on any finished or
failed run folder, and on a sweep from its jobs' results.json alone. It never trains and never changes those files.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from descent.compare import answer
from descent.plots import Band
from descent.results import overrides_of, read_results, status_of
from descent.tables import markdown

TABLE_NUMBERS = ("best_epoch", "epochs", "steps", "duration_s", "peak_rss_mb", "peak_gpu_mb")


def _metrics_of(entry: dict[str, Any]) -> dict[str, float]:
    return dict(entry.get("metrics") or entry.get("mean") or {})  # a CV job of a sweep: its means


def _curves(run_dir: Path) -> dict[str, list[float]] | None:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    return {column: frame[column].tolist() for column in frame.columns} if len(frame) else None


def _image(path: Path, alt: str) -> str:
    return f"![{alt}]({path.name})"


def draw_missing_confusions(folders: list[Path]) -> None:
    """confusion_matrix.png in each run folder that has none yet, from its results.json's `confusion` (a sweep's
    jobs leave it to the report: descent.train.draws_confusion_now), one figure per number of classes."""
    from descent import plots

    missing: dict[int, list[tuple[np.ndarray, Path]]] = {}
    for folder in folders:
        matrix = (read_results(folder) or {}).get("confusion")
        if matrix and not (folder / "confusion_matrix.png").is_file():
            missing.setdefault(len(matrix), []).append((np.asarray(matrix), folder / "confusion_matrix.png"))
    for pairs in missing.values():
        plots.confusion_matrices([matrix for matrix, _ in pairs], [path for _, path in pairs])


def report_run(run_dir: Path, b: float = 0.9) -> Path:
    """learning_curves.png (loss and accuracy per epoch, the per-step training loss and its bias-corrected EWA)
    and report.md with the best epoch's numbers."""
    from descent import plots

    results = read_results(run_dir)
    lines = [
        f"# Run `{run_dir.name}`",
        "",
        f"Overrides: `{' '.join(overrides_of(run_dir, results)) or '(defaults)'}`",
        "",
        f"Status: **{results.get('status')}**" + (f" ({results['error']})" if results.get("error") else ""),
    ]
    metrics = _metrics_of(results)
    if metrics:
        lines += ["", f"Metrics of the best epoch ({results.get('best_epoch')}, chosen on val/acc):", ""]
        lines.append(markdown(["metric", "value"], [[key, value] for key, value in metrics.items()]))
    numbers = [[key, results[key]] for key in (*TABLE_NUMBERS, "n_train", "train_samples_per_s") if key in results]
    if numbers:
        lines += ["", markdown(["", "value"], numbers)]
    epochs = _curves(run_dir)
    if epochs:
        steps_path = run_dir / "steps.csv"
        steps = pd.read_csv(steps_path) if steps_path.is_file() else None
        has_steps = steps is not None and len(steps) > 0
        png = plots.learning_curves(
            epochs,
            steps["step"].tolist() if has_steps else None,
            steps["loss"].tolist() if has_steps else None,
            b,
            run_dir / "learning_curves.png",
            f"{run_dir.name}: learning curves",
        )
        lines += ["", "## Learning curves", "", _image(png, "learning curves")]
        if has_steps:
            lines += [
                "",
                f"Right: the training loss of every step (grey) and its exponentially weighted average "
                f"v_t = {b} v_(t-1) + {1 - b:.2g} y_t, divided by 1 - {b}^t (bias correction).",
            ]
    draw_missing_confusions([run_dir])
    if (run_dir / "confusion_matrix.png").is_file():
        lines += ["", "## Test confusion matrix", "", _image(run_dir / "confusion_matrix.png", "confusion matrix")]
    return _write(run_dir, lines)


def report_cv(cv_dir: Path) -> Path:
    """fold_curves.png (val loss and accuracy per epoch, one line per fold), cv_metrics.png (mean +- std of every
    metric over folds) and report.md with one row per fold."""
    from descent import plots

    results = read_results(cv_dir)
    mean = {key: value for key, value in (results.get("mean") or {}).items() if value is not None}
    std = {key: value or 0.0 for key, value in (results.get("std") or {}).items()}  # null: a single fold
    folds = list(results.get("folds") or [])
    lines = [f"# Cross-validation `{cv_dir.name}`: {len(folds)} folds", ""]
    metric_names = list(mean) or sorted({key for fold in folds for key in _metrics_of(fold)})
    lines.append(markdown(["metric", "mean", "std"], [[m, mean.get(m), std.get(m)] for m in metric_names]))
    rows = [
        [fold.get("dir", f"fold_{i}"), fold.get("status"), *(_metrics_of(fold).get(m) for m in metric_names)]
        for i, fold in enumerate(folds)
    ]
    lines += ["", "## Folds", "", markdown(["fold", "status", *metric_names], rows)]
    if mean:
        png = plots.mean_std_bars(
            mean, std, cv_dir / "cv_metrics.png", f"{cv_dir.name}: mean ± std over {len(folds)} folds"
        )
        lines += ["", _image(png, "mean and std over folds")]
    curves = {path.name: c for path in sorted(cv_dir.glob("fold_*")) if (c := _curves(path))}
    if curves:
        png = plots.fold_curves(curves, cv_dir / "fold_curves.png", f"{cv_dir.name}: validation curves per fold")
        lines += ["", "## Validation curves per fold", "", _image(png, "validation curves per fold")]
    return _write(cv_dir, lines)


def replicate_folders(job_dir: Path, results: dict[str, Any]) -> list[Path]:
    """The run folders of a job's finished replicates: its folds, its `replicates`, or the job itself."""
    entries = results.get("folds") or results.get("replicates")
    if entries is None:
        return [job_dir] if status_of(results).finished else []
    return [job_dir / entry["dir"] for entry in entries if status_of(entry).finished and entry.get("dir")]


def band(frames: list[pd.DataFrame], x: str, y: str) -> Band:
    """y against x over replicates, row by row (their i-th validation, or step): the mean x, the mean y and its std
    over the replicates that have that row (early stopping ends some sooner)."""
    from descent import plots

    usable = [frame for frame in frames if x in frame and y in frame and len(frame)]
    length = max((len(frame) for frame in usable), default=0)
    xs, means, stds = [], [], []
    for row in range(length):
        at = [frame.iloc[row] for frame in usable if len(frame) > row]
        ys = np.array([value[y] for value in at], dtype=float)
        xs.append(float(np.mean([value[x] for value in at])))
        means.append(float(np.nanmean(ys)) if np.isfinite(ys).any() else math.nan)
        stds.append(float(np.nanstd(ys, ddof=1)) if np.isfinite(ys).sum() > 1 else 0.0)
    return plots.Band(xs, means, stds, len(usable))


def curve_panels(settings: dict[str, list[Path]], b: float) -> dict[str, dict[str, Band]]:
    """The banded curves of each setting (a name and its replicates' run folders): val/acc against epochs, optimizer
    steps and seconds, and the training loss of every step smoothed by the course's exponentially weighted average."""
    from descent.plots import ewa

    panels: dict[str, dict[str, Band]] = {
        "val/acc against epoch": {},
        "val/acc against optimizer step": {},
        "val/acc against seconds of training": {},
        f"training loss (EWA, b={b}) against optimizer step": {},
    }
    for name, folders in settings.items():
        epochs = [pd.read_csv(f / "metrics.csv") for f in folders if (f / "metrics.csv").is_file()]
        steps = [pd.read_csv(f / "steps.csv") for f in folders if (f / "steps.csv").is_file()]
        steps = [frame.assign(smoothed=ewa(frame["loss"].to_numpy(), b)) for frame in steps if len(frame)]
        for panel, frames, x, y in zip(
            panels,
            (epochs, epochs, epochs, steps),
            ("epoch", "step", "time_s", "step"),
            ("val/acc", "val/acc", "val/acc", "smoothed"),
            strict=True,
        ):
            if any(len(frame) for frame in frames):
                panels[panel][name] = band(frames, x, y)
    return panels


def report_sweep(sweep_dir: Path, b: float = 0.9) -> Path:
    """The answer first (each setting's mean and 95% interval, its verdict), the settings table, the jobs' table;
    compare_<key>.png (each setting's mean and interval with its replicates as dots, against each swept key) and
    curves.png (one mean line with a band per setting). A seed is never a setting: nothing is drawn against it."""
    from descent import plots
    from descent.compare import setting_of
    from descent.summary import job_folders, settings_table, summarize, summary_markdown, write_settings
    from descent.sweep import sweep_compare

    own = sweep_compare(job_folders(sweep_dir))
    metric, alpha = own.get("metric", "val/acc"), own.get("alpha", 0.05)
    rows = write_settings(sweep_dir, metric, alpha)
    jobs = [(path, results) for path in job_folders(sweep_dir) if (results := read_results(path)) is not None]
    failed = [path.name for path, results in jobs if not status_of(results).finished]
    lines = [f"# Sweep `{sweep_dir.name}`: {len(jobs)} jobs, {len(rows)} settings", ""]
    if rows:
        lines += [
            f"**{answer(rows, metric)}**",
            "",
            markdown(*settings_table(rows, ("val/acc", "test/acc", "test/loss", "to_target/seconds"))),
        ]
    else:
        lines.append("No job finished.")
    if failed:
        lines += ["", f"Failed jobs: {', '.join(failed)}."]
    lines += ["", "## Jobs (best val/acc first)", "", summary_markdown(*summarize(sweep_dir))]

    label_of = {row["setting"]: row["label"] for row in rows}
    folders: dict[str, list[Path]] = {}
    for path, results in jobs:
        name = label_of.get(setting_of(overrides_of(path, results)))
        if name is not None:
            folders.setdefault(name, []).extend(replicate_folders(path, results))
    draw_missing_confusions([folder for group in folders.values() for folder in group])
    swept = [
        key
        for key in (rows[0] if rows else {})
        if key not in ("setting", "label", "n")
        and "/" not in key
        and not key.startswith(("paired_by", "verdict", "p_"))
    ]
    for key in swept:
        points = [
            plots.SettingPoint(
                value=row[key],
                series=" ".join(f"{k}={row[k]}" for k in swept if k != key),
                values=[v for v in replicate_values(folders.get(row["label"], []), metric) if v is not None],
                mean=row[f"{metric}_mean"],
                low=row[f"{metric}_ci_low"],
                high=row[f"{metric}_ci_high"],
                verdict=row["verdict"] + (f" (p={row['p_value']:.2g})" if row["p_value"] is not None else ""),
            )
            for row in rows
            if row[f"{metric}_mean"] is not None
        ]
        safe = re.sub(r"\W+", "_", key).strip("_")
        n = sorted({row["n"] for row in rows})
        title = f"{metric} by {key}: mean and 95% interval over n={'/'.join(map(str, n))} replicates"
        png = plots.settings_compared(points, key, metric, sweep_dir / f"compare_{safe}.png", title)
        lines += ["", f"## {key}", "", _image(png, f"{metric} by {key}")]
    panels = curve_panels(folders, b)
    if any(panels.values()):
        title = f"{sweep_dir.name}: each setting's mean over its replicates, band ±1 std"
        png = plots.banded_curves(panels, sweep_dir / "curves.png", title, log_y=[list(panels)[-1]])
        lines += ["", "## Curves", "", _image(png, "mean curves per setting")]
    return _write(sweep_dir, lines)


def replicate_values(folders: list[Path], metric: str) -> list[float | None]:
    """`metric` of each replicate's results.json (its best epoch's, or its to_target's)."""
    values = []
    for folder in folders:
        results = read_results(folder) or {}
        if metric.startswith("to_target/"):
            values.append((results.get("to_target") or {}).get("seconds" if metric.endswith("seconds") else "step"))
        else:
            values.append((results.get("metrics") or {}).get(metric))
    return values


def report_replicates(run_dir: Path, b: float = 0.9) -> Path:
    """A run of k replicates: each metric's mean, std and 95% interval, one row per replicate, and curves.png (the
    mean line of the replicates with a band of ±1 std)."""
    from descent import plots

    results = read_results(run_dir)
    entries = results.get("replicates") or []
    names = list(results.get("mean") or {})
    rows = [[m, results["mean"][m], results["std"].get(m), *results["ci95"].get(m, [None, None])] for m in names]
    lines = [
        f"# Run `{run_dir.name}`: {len(entries)} replicates",
        "",
        f"Overrides: `{' '.join(overrides_of(run_dir, results)) or '(defaults)'}`",
        "",
        markdown(["metric", "mean", "std", "95% low", "95% high"], rows),
        "",
        "## Replicates",
        "",
        markdown(
            ["replicate", "seed", "status", *names],
            [[e["dir"], e["seed"], e["status"], *((e.get("metrics") or {}).get(m) for m in names)] for e in entries],
        ),
    ]
    folders = replicate_folders(run_dir, results)
    draw_missing_confusions(folders)
    panels = curve_panels({run_dir.name: folders}, b)
    if any(panels.values()):
        title = f"{run_dir.name}: mean over {len(entries)} replicates, band ±1 std"
        png = plots.banded_curves(panels, run_dir / "curves.png", title, log_y=[list(panels)[-1]])
        lines += ["", "## Curves", "", _image(png, "mean curves of the replicates")]
    return _write(run_dir, lines)


def _write(folder: Path, lines: list[str]) -> Path:
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def report(folder: Path, b: float = 0.9) -> Path:
    """The report of a run, CV or sweep folder, told apart by their files (see the contract's Outputs)."""
    results = read_results(folder)
    if results is not None:
        if "folds" in results:
            return report_cv(folder)
        return report_replicates(folder, b) if "replicates" in results else report_run(folder, b)
    if any(read_results(path) is not None for path in folder.iterdir() if path.is_dir()):
        return report_sweep(folder, b)
    raise FileNotFoundError(f"{folder}: not a run folder (no results.json) nor a sweep folder (no <job>/results.json)")

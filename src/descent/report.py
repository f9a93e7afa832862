"""Tables and plots from folders on disk: a run, a cross-validation run or a sweep -> PNGs and a report.md beside them.

It reads only files (results.json, metrics.csv, steps.csv, .hydra/overrides.yaml), so it works on any finished or
failed run folder, and on a sweep from its jobs' results.json alone. It never trains and never changes those files.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from descent.results import overrides_of, read_results, status_of
from descent.tables import cell, markdown

RANK_METRIC = "val/acc"  # the sweep's winner is chosen on validation, as the best epoch is; test is only reported
TABLE_NUMBERS = ("best_epoch", "epochs", "steps", "duration_s", "peak_rss_mb", "peak_gpu_mb")
CURVE_AXES = (("epoch", "epoch"), ("step", "optimizer steps"), ("time_s", "wall-clock seconds"))


def _metrics_of(entry: dict[str, Any]) -> dict[str, float]:
    return dict(entry.get("metrics") or entry.get("mean") or {})  # a CV job of a sweep: its means


def _curves(run_dir: Path) -> dict[str, list[float]] | None:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    return {column: frame[column].tolist() for column in frame.columns} if len(frame) else None


def _parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """{key: value} with Hydra's own override parser (numbers come back as numbers, lists as lists)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return {override.key_or_group: override.value() for override in parsed}


def _image(path: Path, alt: str) -> str:
    return f"![{alt}]({path.name})"


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


def _jobs(sweep_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    from descent.summary import job_folders

    return [(path, results) for path in job_folders(sweep_dir) if (results := read_results(path)) is not None]


def report_sweep(sweep_dir: Path) -> Path:
    """The summary table (one row per job, best first), the winner and its margin, the best val/acc against each
    swept key, and validation curves of every job coloured by each swept value against epochs, steps and seconds."""
    from descent import plots
    from descent.summary import summarize, summary_markdown

    jobs = _jobs(sweep_dir)
    settings = {path.name: _parse_overrides(overrides_of(path, results)) for path, results in jobs}
    all_keys = list(dict.fromkeys(key for setting in settings.values() for key in setting))
    swept = [key for key in all_keys if len({repr(s.get(key)) for s in settings.values()}) > 1]

    def score(results: dict[str, Any]) -> float:
        value = _metrics_of(results).get(RANK_METRIC)
        return value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf

    ranked = sorted(jobs, key=lambda job: score(job[1]), reverse=True)
    lines = [
        f"# Sweep `{sweep_dir.name}`: {len(jobs)} jobs",
        "",
        _verdict(ranked, settings, swept),
        "",
        "## Summary (best val/acc first)",
        "",
        summary_markdown(*summarize(sweep_dir)),  # the table of summary.md
    ]
    curves = [(path.name, c) for path, _ in jobs if (c := _curves(path))]
    for key in swept:

        def others(name: str, key: str = key) -> str:  # the job's other swept values, to tell its point and line
            return " ".join(f"{k}={settings[name].get(k)}" for k in swept if k != key)

        scored = [(path.name, score(results)) for path, results in jobs if math.isfinite(score(results))]
        safe = re.sub(r"\W+", "_", key).strip("_")
        lines += ["", f"## {key}", ""]
        if scored:
            png = plots.metric_against_key([settings[name].get(key) for name, _ in scored], [s for _, s in scored],
                                           [others(name) for name, _ in scored], key, RANK_METRIC,
                                           sweep_dir / f"best_{safe}.png")  # fmt: skip
            lines.append(_image(png, f"best {RANK_METRIC} against {key}"))
        if curves:
            labelled = [(f"{key}={settings[name].get(key)}", others(name), c) for name, c in curves]
            png = plots.overlaid_curves(labelled, ("val/loss", "val/acc"), CURVE_AXES, sweep_dir / f"curves_{safe}.png",
                                        f"validation curves coloured by {key}")  # fmt: skip
            lines += ["", _image(png, f"validation curves coloured by {key}")]
    return _write(sweep_dir, lines)


def _verdict(ranked: list[tuple[Path, dict[str, Any]]], settings: dict[str, dict], swept: list[str]) -> str:
    """One sentence: which job won on val/acc, with which setting, by how much over the runner-up."""
    finished = [(path, r) for path, r in ranked if RANK_METRIC in _metrics_of(r)]
    if not finished:
        return "No job finished with a validation accuracy."
    path, best = finished[0]
    setting = " ".join(f"{k}={settings[path.name].get(k)}" for k in swept) or "(all jobs alike)"
    text = f"**Best: job {path.name}** ({setting}): {RANK_METRIC} {cell(_metrics_of(best)[RANK_METRIC])}"
    if "test/acc" in _metrics_of(best):
        text += f", test/acc {cell(_metrics_of(best)['test/acc'])}"
    if len(finished) > 1:
        runner_path, runner = finished[1]
        margin = _metrics_of(best)[RANK_METRIC] - _metrics_of(runner)[RANK_METRIC]
        text += f"; {margin:+.4f} {RANK_METRIC} over the runner-up, job {runner_path.name}"
    failed = [path.name for path, r in ranked if not status_of(r).finished]
    return text + (f". Failed jobs: {', '.join(failed)}." if failed else ".")


def _write(folder: Path, lines: list[str]) -> Path:
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def report(folder: Path, b: float = 0.9) -> Path:
    """The report of a run, CV or sweep folder, told apart by their files (see the contract's Outputs)."""
    results = read_results(folder)
    if results is not None:
        return report_cv(folder) if "folds" in results else report_run(folder, b)
    if any(read_results(path) is not None for path in folder.iterdir() if path.is_dir()):
        return report_sweep(folder)
    raise FileNotFoundError(f"{folder}: not a run folder (no results.json) nor a sweep folder (no <job>/results.json)")

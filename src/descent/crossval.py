"""k-fold cross-validation: run the folds, then aggregate them (per-fold numbers, mean and std of every metric, a
table); and gather the folds that a sweep ran as separate jobs (`cv.fold=i`).

Each fold is a full run folder `fold_<i>/` made by train.py's `fit_and_test`. This module never splits data (the
folds come from `descent.data.splits`) and never trains by itself: it is handed the function that does.

`python -m descent.crossval SWEEP_DIR` gathers the folds of a sweep's jobs into SWEEP_DIR/crossval.json and prints
their table.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from descent.results import RESULTS, Status, read_results, recorded, write_json
from descent.tables import rich_table

log = logging.getLogger("descent")
# the columns of the table, in this order when present; any other metric follows
FIRST_METRICS = ("test/acc", "test/loss", "test/f1", "val/acc", "val/loss", "val/f1", "train/acc", "train/loss")


def cross_validate(
    cfg: DictConfig, source: Any, splits: Sequence[Any], run_dir: Path, fit: Callable[..., dict[str, Any]]
) -> dict[str, Any]:
    """Fit and test every fold (or only `cv.fold`), each from the same seed, into `run_dir/fold_<i>/`; return the
    CV run's results: `folds`, `mean`, `std`, and `metrics` = the mean (what a sweep over CV runs optimizes)."""
    import pytorch_lightning as pl

    chosen = range(len(splits)) if cfg.cv.get("fold") is None else [cfg.cv.fold]
    folds = []
    for fold in chosen:
        fold_dir = run_dir / f"fold_{fold}"
        log.info("fold %d of %d -> %s", fold, len(splits), fold_dir)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)  # fold i alone (cv.fold=i) = fold i of the loop
        with recorded(fold_dir, {"status": Status.FAILED, "error": None, "fold": fold}) as results:
            results |= fit(cfg, source, splits[fold], fold_dir, group=run_dir.name, job_type="fold")
        folds.append({**results, "dir": fold_dir.name})
    summary = summarize(folds)
    if len(folds) == len(splits):
        tested = np.sort(np.concatenate([split.test for split in splits]))
        summary["every_sample_tested_once"] = bool(np.array_equal(tested, np.arange(len(source.labels))))
    print_table(summary, title=f"{len(splits)}-fold cross-validation: {run_dir}")
    return summary


def summarize(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """The CV results of these folds: each fold's numbers, and the mean and (sample, n-1) std of every metric."""
    names = sorted({name for fold in folds for name in fold["metrics"]})
    values = {name: np.array([_number(fold["metrics"].get(name)) for fold in folds]) for name in names}
    mean = {name: float(np.mean(v)) for name, v in values.items()}
    std = {name: float(np.std(v, ddof=1)) if len(v) > 1 else math.nan for name, v in values.items()}
    status = next((fold["status"] for fold in folds if fold["status"] != Status.OK), Status.OK)
    keys = ("fold", "dir", "status", "error", "metrics", "best_epoch", "epochs", "steps", "n_train", "n_val", "n_test")
    return {
        "status": status,
        "error": next((fold["error"] for fold in folds if fold.get("error")), None),
        "folds": [{key: fold.get(key) for key in keys} for fold in folds],
        "mean": mean,
        "std": std,
        "metrics": mean,
        "best_epoch": [fold.get("best_epoch") for fold in folds],
        # the longest fold's, as a single run counts them (each fold's own are in `folds`)
        "epochs": max((fold.get("epochs") or 0 for fold in folds), default=0),
        "steps": max((fold.get("steps") or 0 for fold in folds), default=0),
        "n_test": sum(fold.get("n_test") or 0 for fold in folds),
    }


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def print_table(summary: dict[str, Any], title: str) -> None:
    """One row per metric: its value in each fold, then the mean and std over folds (rich). Folds are columns, so
    the table fits a terminal whatever the number of metrics."""
    from rich.console import Console

    names = [name for name in FIRST_METRICS if name in summary["mean"]]
    names += sorted(set(summary["mean"]) - set(names))
    folds = summary["folds"]
    not_ok = [f"fold {fold['fold']}: {Status(fold['status']).value}" for fold in folds if fold["status"] != Status.OK]
    columns = ["metric", *(f"fold {fold['fold']}" for fold in folds), "mean", "std"]
    rows = [
        [name, *(fold["metrics"].get(name) for fold in folds), summary["mean"][name], summary["std"][name]]
        for name in names
    ]
    Console().print(rich_table(" ".join([title, *not_ok]), columns, rows))


def gather(sweep_dir: Path) -> list[dict[str, Any]]:
    """The CV results of a sweep whose jobs each ran one fold (`cv.fold=i`), one entry per setting: jobs with the
    same overrides but for `cv.fold` are folds of one cross-validation. Written to SWEEP_DIR/crossval.json."""
    settings: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for path in sorted(sweep_dir.glob(f"*/{RESULTS}")):
        job = read_results(path.parent)
        setting = tuple(o for o in job.get("overrides", []) if not o.startswith("cv.fold="))
        folds = [{**fold, "dir": str(path.parent.name + "/" + fold["dir"])} for fold in job.get("folds", [])]
        settings.setdefault(setting, []).extend(folds)
    gathered = []
    for setting, folds in settings.items():
        if not folds:
            continue
        summary = {"overrides": list(setting), **summarize(sorted(folds, key=lambda fold: fold["fold"]))}
        print_table(summary, title=" ".join(setting) or str(sweep_dir))
        gathered.append(summary)
    write_json(sweep_dir / "crossval.json", {"settings": gathered})
    return gathered


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python -m descent.crossval SWEEP_DIR  (a sweep whose jobs ran cv.fold=0,1,...)")
    if not gather(Path(sys.argv[1])):
        sys.exit(f"no job of {sys.argv[1]} holds folds: run the sweep with cv.folds=k cv.fold=0,1,...,k-1")

"""Replicates: k models of one setting on one split, seeds `seed` ... `seed+k-1` (`replicates=k`), each a run folder
`replicate_<i>/`; the run's results.json adds `replicates`, and the `mean`, `std` and 95% interval (`ci95`) of every
metric over them, as a CV run adds its folds.

This module never splits data nor trains by itself: it is handed the split and the function that trains one model.
A replicate already finished in its folder (the same command started again after an interruption) is kept; an
interrupted one resumes from its last.ckpt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from descent.results import Status, read_results, recorded, status_of

log = logging.getLogger("descent")
ENTRY_KEYS = ("replicate", "seed", "dir", "status", "error", "metrics", "best_epoch", "epochs", "steps", "to_target")


def replicate_config(cfg: DictConfig, index: int, run_dir: Path) -> DictConfig:
    """The config of replicate `index`: the run's, with seed + index, resuming from the replicate's last.ckpt when an
    earlier attempt at it was interrupted."""
    replicate = cfg.copy()
    last = run_dir / "checkpoints" / "last.ckpt"
    with open_dict(replicate):
        replicate.seed = cfg.seed + index
        replicate.replicates = 1
        if status_of(read_results(run_dir)) == Status.INTERRUPTED and last.is_file():
            replicate.ckpt_path = str(last)
    return replicate


def train_replicates(
    cfg: DictConfig, source: Any, split: Any, run_dir: Path, fit: Callable[..., dict[str, Any]]
) -> dict[str, Any]:
    """Fit and test the `replicates` models one after another, replicate i from seed + i into
    `run_dir/replicate_<i>/`; return the run's results: `replicates`, `mean`, `std`, `ci95`, and `metrics` = the mean
    (what a sweep over such runs optimizes)."""
    import pytorch_lightning as pl

    entries = []
    for index in range(cfg.replicates):
        replicate_dir = run_dir / f"replicate_{index}"
        done = read_results(replicate_dir)
        if done is not None and status_of(done).finished and done.get("seed") == cfg.seed + index:
            log.info("replicate %d: kept, %s says %s", index, replicate_dir / "results.json", done["status"])
            entries.append({**done, "dir": replicate_dir.name})
            continue
        replicate = replicate_config(cfg, index, replicate_dir)
        log.info("replicate %d of %d (seed %d) -> %s", index, cfg.replicates, replicate.seed, replicate_dir)
        pl.seed_everything(replicate.seed, workers=True, verbose=False)  # replicate i = a run of seed + i
        start = {"status": Status.FAILED, "error": None, "replicate": index, "seed": replicate.seed}
        with recorded(replicate_dir, start) as results:
            results |= fit(replicate, source, split, replicate_dir, group=run_dir.name, job_type="replicate")
        entries.append({**results, "dir": replicate_dir.name})
    return summarize(entries)


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's results over its replicates: each one's numbers, and the mean, sample std and 95% Student-t interval
    of every metric (over the replicates that have it)."""
    from descent.compare import interval

    names = sorted({name for entry in entries for name in entry.get("metrics") or {}})
    stats = {name: interval([(entry.get("metrics") or {}).get(name) for entry in entries]) for name in names}
    status = next((entry["status"] for entry in entries if entry["status"] != Status.OK), Status.OK)
    return {
        "status": status,
        "error": next((entry["error"] for entry in entries if entry.get("error")), None),
        "replicates": [{key: entry.get(key) for key in ENTRY_KEYS} for entry in entries],
        "mean": {name: value.mean for name, value in stats.items()},
        "std": {name: value.std for name, value in stats.items()},
        "ci95": {name: [value.low, value.high] for name, value in stats.items()},
        "metrics": {name: value.mean for name, value in stats.items()},
        "epochs": sum(entry.get("epochs") or 0 for entry in entries),
        "steps": sum(entry.get("steps") or 0 for entry in entries),
        "best_epoch": [entry.get("best_epoch") for entry in entries],
        **{key: entries[0].get(key) for key in ("n_train", "n_val", "n_test", "batch_size") if entries},
    }

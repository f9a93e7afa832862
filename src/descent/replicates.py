"""Replicates: k models of one setting on one split, seeds `seed` ... `seed+k-1` (`replicates=k`), each a run folder
`replicate_<i>/`; the run's results.json adds `replicates`, and the `mean`, `std` and 95% interval (`ci95`) of every
metric over them, as a CV run adds its folds.

This module never splits data nor trains by itself: it is handed the split and the function that trains one model (or
the one that trains several at once, descent.vectorized). A replicate already finished in its folder (the same command
started again after an interruption) is kept; an interrupted one resumes from its last.ckpt (one after another), or
the run from its own checkpoints/last.ckpt (at once).
"""

from __future__ import annotations

import contextlib
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
    cfg: DictConfig,
    source: Any,
    split: Any,
    run_dir: Path,
    fit: Callable[..., dict[str, Any]],
    fit_at_once: Callable[..., list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Fit and test the `replicates` models, replicate i from seed + i into `run_dir/replicate_<i>/`: one after
    another with `fit`, or all those not finished yet at once with `fit_at_once`; return the run's results:
    `replicates`, `mean`, `std`, `ci95`, and `metrics` = the mean (what a sweep over such runs optimizes)."""
    entries: dict[int, dict[str, Any]] = {}
    for index in range(cfg.replicates):
        replicate_dir = run_dir / f"replicate_{index}"
        done = read_results(replicate_dir)
        if done is not None and status_of(done).finished and done.get("seed") == cfg.seed + index:
            log.info("replicate %d: kept, %s says %s", index, replicate_dir / "results.json", done["status"])
            entries[index] = {**done, "dir": replicate_dir.name}
    todo = [index for index in range(cfg.replicates) if index not in entries]
    if fit_at_once is not None and todo:
        with contextlib.ExitStack() as stack:
            records = {
                index: stack.enter_context(recorded(run_dir / f"replicate_{index}", start(cfg, index)))
                for index in todo
            }
            for index, results in zip(todo, fit_at_once(cfg, source, split, run_dir, todo), strict=True):
                records[index] |= results
        entries |= {index: {**records[index], "dir": f"replicate_{index}"} for index in todo}
    else:
        entries |= {index: fit_one(cfg, source, split, run_dir, fit, index) for index in todo}
    return summarize([entries[index] for index in range(cfg.replicates)])


def start(cfg: DictConfig, index: int) -> dict[str, Any]:
    """What replicate `index`'s results.json says until it has trained: failed, unless the training ends."""
    return {"status": Status.FAILED, "error": None, "replicate": index, "seed": cfg.seed + index}


def fit_one(
    cfg: DictConfig, source: Any, split: Any, run_dir: Path, fit: Callable[..., dict[str, Any]], index: int
) -> dict[str, Any]:
    """Fit and test replicate `index` on its own, as a run of seed + index, into `run_dir/replicate_<index>/`."""
    import pytorch_lightning as pl

    replicate_dir = run_dir / f"replicate_{index}"
    replicate = replicate_config(cfg, index, replicate_dir)
    log.info("replicate %d of %d (seed %d) -> %s", index, cfg.replicates, replicate.seed, replicate_dir)
    pl.seed_everything(replicate.seed, workers=True, verbose=False)  # replicate i = a run of seed + i
    with recorded(replicate_dir, start(cfg, index)) as results:
        results |= fit(replicate, source, split, replicate_dir, group=run_dir.name, job_type="replicate")
    return {**results, "dir": replicate_dir.name}


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
        # the longest replicate's, as a single run of the setting counts them (each one's own are in `replicates`)
        "epochs": max((entry.get("epochs") or 0 for entry in entries), default=0),
        "steps": max((entry.get("steps") or 0 for entry in entries), default=0),
        "best_epoch": [entry.get("best_epoch") for entry in entries],
        **{key: entries[0].get(key) for key in ("n_train", "n_val", "n_test", "batch_size") if entries},
    }

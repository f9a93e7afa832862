"""`python train.py [OVERRIDES]`: one run. Validate the config, then source -> split -> DataModule -> model ->
Trainer: fit on train, keep the epoch with the best val/acc (best.ckpt), test it, write results.json.

A bad value ends the run before training with one message naming the key (exit 2, status `failed`). Inside a sweep
(-m) each job runs through `descent.sweep.sweep_job`, which never stops the sweep.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from descent import CONF_DIR
from descent.callbacks import EpochHistory, GracefulStop, steps_taken
from descent.compare import estimate
from descent.config import ConfigError, check_batch_size, exit_on_config_error, typed_unless_secret, validate
from descent.results import Status, recorded, task_overrides
from descent.resume import Interrupted, carry_over, exit_on_interrupt, extended_from, resumed_config, stop_on_signal
from descent.sweep import in_sweep, sweep_job
from descent.trainer import (
    build_trainer,
    freeze_heap,
    loader_fractions,
    quiet_lightning,
    set_threads,
    setting_errors,
    unset_empty_variables,
)

log = logging.getLogger("descent")


def build_model(cfg: DictConfig, source: Any, split: Any) -> Any:
    """The Classifier of `model.*` and `optimizer.*`, with the training split's pixel statistics as buffers."""
    from descent.data.datamodule import feature_stats
    from descent.model import Classifier

    model = Classifier(
        input_shape=list(source.image_shape),
        num_classes=source.num_classes,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.scheduler else None,
        class_names=source.class_names,
    )
    model.set_standardization(*map(torch.from_numpy, feature_stats(source.images, split.train)))
    return model


def build_datamodule(cfg: DictConfig, source: Any, split: Any, batch_size: int) -> Any:
    """The DataModule of `data.*` over `split`, training batches of `batch_size` (already checked), applying the
    `trainer.limit_*_batches` fractions itself (descent.trainer.loader_fractions)."""
    from descent.data.datamodule import ImageDataModule

    return ImageDataModule(
        source,
        split,
        batch_size,
        cfg.data.eval_batch_size,
        cfg.seed,
        stream=cfg.data.get("stream"),
        fractions=loader_fractions(cfg.trainer),
    )


def check_limited_batches(cfg: DictConfig, n_train: int, batch_size: int) -> None:
    """Refuse a `trainer.limit_train_batches` (or `overfit_batches`) fraction that leaves a training batch of one
    sample with batch norm, which cannot normalize it."""
    from descent.data.batches import batch_bounds, limited_bounds

    fraction = loader_fractions(cfg.trainer).get("train")
    bounds = limited_bounds(batch_bounds(n_train, batch_size), fraction)
    if cfg.model.get("batch_norm", False) and fraction and bounds[0][1] - bounds[0][0] == 1:
        key = "trainer.overfit_batches" if cfg.trainer.get("overfit_batches") else "trainer.limit_train_batches"
        allowed = (
            f"it leaves a training batch of one sample, which batch norm cannot normalize: expected at least "
            f"{2 / n_train:.3g} (2 samples), or model.batch_norm=false"
        )
        raise ConfigError(key, fraction, allowed)


def fit_and_test(
    cfg: DictConfig, source: Any, split: Any, run_dir: Path, group: str | None = None, job_type: str = "train"
) -> dict[str, Any]:
    """Train one model on `split`, test its best epoch, and return the results.json content (status and numbers)."""
    from descent.loggers import close_loggers
    from descent.results import is_rank_zero

    batch_size = check_batch_size(cfg.data.batch_size, len(split.train), cfg.model.get("batch_norm", False))
    check_limited_batches(cfg, len(split.train), batch_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_rank_zero():
        split.save(run_dir / "split.npz")
        if cfg.get("ckpt_path"):
            carry_over(cfg.ckpt_path, run_dir)
    datamodule = build_datamodule(cfg, source, split, batch_size)
    found = None
    if cfg.lr_find:
        from descent.lr_find import find_lr, resumed

        # sets cfg.optimizer.lr to its suggestion; a resume goes on with the lr its search found
        found = resumed(cfg, run_dir) if cfg.get("ckpt_path") else find_lr(cfg, source, split, datamodule, run_dir)
    model = build_model(cfg, source, split)
    threads = set_threads(cfg.threads, batch_size, model, list(source.image_shape))
    history = EpochHistory(run_dir / "metrics.csv")
    stopper = GracefulStop(run_dir / "checkpoints" / "last.ckpt")
    trainer = build_trainer(cfg, run_dir, history, stopper, group, job_type, in_sweep=in_sweep())
    log.info(data_line(source, split, batch_size, threads))

    with setting_errors(cfg):
        stop_on_signal(
            lambda: trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True),
            stopper,
        )
    if is_rank_zero() and history.written < len(history.rows):
        history.write()  # a resume with nothing left to train still gets its metrics.csv

    # read before test(), which would reload callback states from a full best.ckpt
    checkpoint = next((c for c in trainer.checkpoint_callbacks if c.monitor), None)
    rows = list(history.rows)
    best = history.best(checkpoint.monitor, checkpoint.mode) if checkpoint is not None else None
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    if not best_path:
        log.warning("no best.ckpt (%s): testing the last weights", no_best_reason(cfg, trainer))
    with setting_errors(cfg):
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)[0]

    diverged = model.diverged_at is not None
    if diverged:
        log.warning(
            "diverged: the training loss became NaN or infinite at step %d; the run stopped there and keeps "
            "the metrics of its best epoch so far (try a smaller optimizer.lr)",
            model.diverged_at,
        )
    results = results_of_fit(
        rows,
        best,
        tested,
        bool(best_path),
        seed=cfg.seed,
        steps=steps_taken(trainer, model),
        samples=history.samples,
        diverged=diverged,
        split=split,
        batch_size=batch_size,
        to_target=history.to_target(cfg.target.val_acc),
    )
    if trainer.fast_dev_run:
        results["fast_dev_run"] = int(trainer.fast_dev_run)
    if found is not None:
        results["lr_find"] = found
    confusion_png = None
    if model.confusion is not None:
        results["confusion"] = model.confusion.tolist()
        if draws_confusion_now(trainer.loggers):
            from descent.plots import confusion_matrix

            confusion_png = confusion_matrix(model.confusion.numpy(), run_dir / "confusion_matrix.png")
    close_loggers(trainer.loggers, results, confusion_png)
    return results


def draws_confusion_now(loggers: list[Any]) -> bool:
    """Whether a run draws its confusion_matrix.png as it ends: a single run does, and a sweep's job only for W&B,
    which logs the image; the other jobs leave it to `scripts/report.py`, which draws it from results.json's
    `confusion` (nobody looks at a job's matrix while the sweep runs, and drawing it costs more than an epoch)."""
    from descent.loggers import logs_images

    return not in_sweep() or logs_images(loggers)


def data_line(source: Any, split: Any, batch_size: int, threads: int) -> str:
    """What a fit trains on, as its log line says it: the data, the split's sizes, the batch size and the threads."""
    return (
        f"data={source.name} n_train={len(split.train)} n_val={len(split.val)} n_test={len(split.test)} "
        f"batch_size={batch_size} threads={threads}"
    )


def no_best_reason(cfg: DictConfig, trainer: Any) -> str:
    """Why a run has no best.ckpt, in the words of the setting that made it so."""
    if trainer.fast_dev_run:
        return "trainer.fast_dev_run skips checkpoints"
    if not any(c.monitor for c in trainer.checkpoint_callbacks):
        return "callbacks.model_checkpoint=null"
    return "no validation ran"


def results_of_fit(
    rows: list[dict[str, float]],
    best: dict[str, float] | None,
    tested: dict[str, Any],
    tested_best: bool,
    *,
    seed: int,
    steps: int,
    samples: int,
    diverged: bool,
    split: Any,
    batch_size: int,
    to_target: dict[str, Any],
) -> dict[str, Any]:
    """The results.json content of one trained model (a run's, or a replicate's trained at once): its best row (None:
    the last one), the test metrics of its best epoch (`tested_best`) or of its last, when it reached the target, its
    seed, epochs, optimizer steps, training samples and status."""
    if not tested_best or best is None:
        best = rows[-1] if rows else {}
    epochs = rows[-1]["epoch"] + 1 if rows else 0  # every epoch ends with a row (a last partial one included)
    seconds = rows[-1]["time_s"] if rows else 0.0  # the whole training time, the part before a resume included
    return {
        "status": Status.DIVERGED if diverged else Status.OK,
        "error": None,
        "metrics": {
            **{key: value for key, value in best.items() if key.startswith(("train/", "val/"))},
            **{key: float(value) for key, value in tested.items()},
        },
        "best_epoch": best.get("epoch"),
        "best_step": best.get("step"),
        "tested": "best" if tested_best else "last",
        "seed": seed,
        "to_target": to_target,
        "epochs": epochs,
        "steps": steps,
        "validations": sum("val/loss" in row for row in rows),
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_test": len(split.test),
        "batch_size": batch_size,
        "train_samples_per_s": round(samples / seconds, 1) if seconds > 0 else None,
    }


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Validate, read the source, split it from `data.split_seed` (stratified on `data.stratify_by`, by
    `data.group_by`), and fit: one model, the k folds of `cv.folds` (each a run folder `fold_<i>/`), or the k
    `replicates` on one split (each a run folder `replicate_<i>/`)."""
    import pytorch_lightning as pl

    from descent.crossval import cross_validate
    from descent.data.sources import build_source
    from descent.data.splits import make_splits
    from descent.replicates import train_replicates
    from descent.vectorized import fit_at_once

    validate(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    source = build_source(cfg.data)
    columns = {name: source.column(name) for name in cfg.data.stratify_by}
    groups = source.column(cfg.data.group_by) if cfg.data.group_by else None
    test = source.official_test() if cfg.data.get("official_test") else None
    fractions = tuple(cfg.data.split)
    splits = make_splits(len(source.labels), columns, fractions, cfg.data.split_seed, cfg.cv.folds, groups, test)
    if cfg.cv.folds:
        return cross_validate(cfg, source, splits, run_dir, fit_and_test)
    if cfg.replicates > 1:
        at_once = fit_at_once if cfg.replicates_vectorized else None
        return train_replicates(cfg, source, splits[0], run_dir, fit_and_test, at_once)
    return fit_and_test(cfg, source, splits[0], run_dir)


def run(cfg: DictConfig) -> dict[str, Any]:
    """One run: train, then write results.json whatever happened (ok, diverged, failed or interrupted)."""
    quiet_lightning()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    results: dict[str, Any] = {"status": Status.FAILED, "error": None, "overrides": task_overrides()}
    with recorded(run_dir, results):
        try:
            cfg, results["overrides"] = resumed_config(cfg, results["overrides"], run_dir)
            results |= extended_from(cfg)
            results["tags"] = typed_unless_secret(cfg.get("tags")) or []
            results |= train(cfg, run_dir)
        except Interrupted as stop:
            log.warning(
                "interrupted: %s; resume with: python train.py ckpt_path=%s hydra.run.dir=%s",
                stop,
                stop.last_checkpoint,
                run_dir,
            )
            raise
    metrics = results["metrics"]
    if "replicates" in results:
        val, test = (results["mean"].get(m) for m in ("val/acc", "test/acc"))
        low, high = results["ci95"].get("val/acc", [None, None])
        shown = estimate(val, low, high) if val is not None else "-"
        log.info(
            "%s: %d replicates, val/acc %s (95%% CI), mean test/acc %s -> %s",
            Status(results["status"]).value,
            len(results["replicates"]),
            shown,
            "-" if test is None else f"{test:.4f}",
            run_dir / "results.json",
        )
        return results
    log.info(
        "%s: test/acc=%.4f val/acc=%.4f (best epoch %s of %d, %d steps) -> %s",
        Status(results["status"]).value,
        metrics.get("test/acc", float("nan")),
        metrics.get("val/acc", float("nan")),
        results["best_epoch"],
        results["epochs"],
        results["steps"],
        run_dir / "results.json",
    )
    return results


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@exit_on_config_error
@exit_on_interrupt
def main(cfg: DictConfig) -> float | None:
    """`python train.py [OVERRIDES]`: one run; returns the best val/acc (what a sweeper maximizes)."""
    unset_empty_variables()
    freeze_heap()
    if in_sweep():
        return sweep_job(cfg, run)
    return run(cfg)["metrics"].get("val/acc")


if __name__ == "__main__":
    main()

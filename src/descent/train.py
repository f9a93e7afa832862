"""The Hydra entry: validate the config, build source -> split -> DataModule -> model -> Trainer, fit, test, write.

Flow of one run (`python train.py [OVERRIDES]`): the config is validated before any data is read; the split is
saved as split.npz; the model trains on train, the epoch with the best val/acc is kept (best.ckpt) and tested.
A bad value ends the run with one message naming the key, and status `failed` in results.json.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

import descent
from descent.config import ConfigError, check_batch_size, check_distributed, exit_on_config_error, validate
from descent.reliability import (
    GracefulStop,
    Interrupted,
    exit_on_interrupt,
    plugins,
    resumed_config,
    run_state,
    stop_on_signal,
    task_overrides,
)
from descent.results import EpochHistory, StepLosses, is_rank_zero, recorded
from descent.sweep import claim_gpu, finished_results, objective, write_summary

CONF_DIR = str(descent.CONF_DIR)
log = logging.getLogger("descent")


def quiet_lightning() -> None:
    """Drop lines that say nothing about the run: Lightning's advert for its cloud service, a deprecation warning
    raised inside Lightning by this torch version, and, under DDP, its advice to sync metrics that torchmetrics
    has already synced across devices."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`")  # a diverged step, on purpose
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(.*sync_dist=True\)")
    lightning_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    lightning_log.addFilter(lambda record: "Tip:" not in record.getMessage())


def freeze_heap() -> None:
    """Move the objects alive now (mostly the ~400,000 that importing torch and Lightning leaves) out of the garbage
    collector's sight: Python's exit runs full collections that traverse them all, ~1.3 s of CPU of a 5 s run.
    Before a later job of the same process (a sweep) it first collects what the previous job left."""
    if gc.get_freeze_count():
        gc.collect()  # cheap: the frozen objects are skipped
    gc.freeze()


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by OMP_NUM_THREADS when set (joblib's workers get
    cores // jobs there, so that parallel jobs split the cores instead of fighting over them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(cores, int(cap)) if cap.isdigit() and int(cap) > 0 else cores


MULTI_THREAD_WORK = 10_000_000  # multiply-adds per step where a second thread starts to pay (measured: batch 128)


def set_threads(threads: int | str, batch_size: int, model: torch.nn.Module) -> int:
    """torch's intra-op threads: `auto` picks them from the work of one step, batch size x the multiply-adds of the
    model's linear layers for one sample: below MULTI_THREAD_WORK one thread (splitting such small operations costs
    more than it gains: 2 threads were ~20% slower at batch 32 on 64-256-256-10), every core above it."""
    work = batch_size * sum(layer.weight.numel() for layer in model.modules() if isinstance(layer, torch.nn.Linear))
    count = threads if threads != "auto" else 1 if work < MULTI_THREAD_WORK else available_cores()
    torch.set_num_threads(int(count))
    return int(count)


def build_callbacks(cfg: DictConfig, run_dir: Path, has_logger: bool) -> list[Any]:
    """The Lightning callbacks of `callbacks.*` that are not null; checkpoints go to <run_dir>/checkpoints."""
    from hydra.utils import get_class, instantiate
    from pytorch_lightning.callbacks import ModelCheckpoint

    callbacks = []
    for name, callback_cfg in (cfg or {}).items():
        if callback_cfg is None:
            continue
        if name == "lr_monitor" and not has_logger:
            log.info("callbacks.lr_monitor is off: it needs a logger (logger=none); metrics.csv still has the lr")
            continue
        saves = "_target_" in callback_cfg and issubclass(get_class(callback_cfg._target_), ModelCheckpoint)
        extra = {"dirpath": run_dir / "checkpoints"} if saves else {}
        callbacks.append(instantiate(callback_cfg, **extra))
    return callbacks


def build_model(cfg: DictConfig, source: Any, split: Any) -> Any:
    """The Classifier of `model.*` and `optimizer.*`, with the training split's pixel statistics as buffers."""
    from descent.data.datamodule import feature_stats
    from descent.model import Classifier

    model = Classifier(
        input_shape=list(source.image_shape),
        num_classes=source.num_classes,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.scheduler else None,
        **OmegaConf.to_container(cfg.model, resolve=True),
    )
    model.set_standardization(*map(torch.from_numpy, feature_stats(source.images, split.train)))
    return model


def build_datamodule(cfg: DictConfig, source: Any, split: Any, batch_size: int) -> Any:
    """The DataModule of `data.*` over `split`, training batches of `batch_size` (already checked)."""
    from descent.data.datamodule import ImageDataModule

    return ImageDataModule(source, split, batch_size, cfg.data.eval_batch_size, cfg.seed, stream=cfg.data.get("stream"))


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    history: EpochHistory,
    stopper: GracefulStop,
    group: str | None = None,
    job_type: str = "train",
    first: tuple[Any, ...] = (),
) -> Any:
    """The Trainer of `trainer.*`: the run's own callbacks (`first`, the epoch history, the step losses, the run
    state, the signal stopper), those of `callbacks.*`, the loggers of `logger.*`, the checkpoint plugins, and with
    `trainer.profiler: null` a profiler that costs nothing (descent.overhead).
    `scripts/bench.py` builds its Trainer here too, so that it measures what a user's run gets."""
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar

    from descent.loggers import FinishWandbOnError, build_loggers
    from descent.overhead import NoProfiler

    loggers = build_loggers(cfg, run_dir, group, job_type)
    callbacks = [*first, history, StepLosses(run_dir / "steps.csv"), FinishWandbOnError(stopper), run_state(cfg),
                 stopper, *build_callbacks(cfg.callbacks, run_dir, has_logger=bool(loggers))]  # fmt: skip
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        profiler=cfg.trainer.get("profiler") or NoProfiler(),
        plugins=plugins(),
        logger=loggers or False,
        default_root_dir=str(run_dir),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
    )
    check_distributed(trainer, cfg.trainer, in_sweep=in_sweep())
    return trainer


def fit_and_test(
    cfg: DictConfig, source: Any, split: Any, run_dir: Path, group: str | None = None, job_type: str = "train"
) -> dict[str, Any]:
    """Train one model on `split`, test its best epoch, and return the results.json content (status and numbers)."""
    from descent.loggers import close_loggers

    batch_size = check_batch_size(cfg.data.batch_size, len(split.train), cfg.model.batch_norm)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_rank_zero():
        split.save(run_dir / "split.npz")
    model = build_model(cfg, source, split)
    threads = set_threads(cfg.threads, batch_size, model)
    datamodule = build_datamodule(cfg, source, split, batch_size)
    history = EpochHistory(run_dir / "metrics.csv")
    stopper = GracefulStop(run_dir / "checkpoints" / "last.ckpt")
    trainer = build_trainer(cfg, run_dir, history, stopper, group, job_type)
    log.info(
        "data=%s n_train=%d n_val=%d n_test=%d batch_size=%d threads=%d",
        source.name, len(split.train), len(split.val), len(split.test), batch_size, threads,
    )  # fmt: skip

    stop_on_signal(
        lambda: trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True), stopper
    )

    # read before test(), which would reload callback states from a full best.ckpt
    rows, best = list(history.rows), history.best()
    best_path = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor), "")
    if not best_path:
        log.warning("no best.ckpt (callbacks.model_checkpoint=null): testing the last epoch's weights")
    tested = trainer.test(model, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)[0]

    if not best_path or best is None:
        best = rows[-1] if rows else {}
    status = "ok"
    if model.diverged_at is not None:
        status = "diverged"
        log.warning(
            "diverged: the training loss became NaN or infinite at step %d; the run stopped there and keeps "
            "the metrics of its best epoch so far (try a smaller optimizer.lr)",
            model.diverged_at,
        )
    epochs = len(rows)
    results = {
        "status": status,
        "error": None,
        "metrics": {
            **{key: value for key, value in best.items() if key.startswith(("train/", "val/"))},
            **{key: float(value) for key, value in tested.items()},
        },
        "best_epoch": best.get("epoch"),
        "tested": "best" if best_path else "last",
        "epochs": epochs,
        "steps": trainer.global_step,
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_test": len(split.test),
        "batch_size": batch_size,
        # over the whole training time, the part before a resume included (rows carry it)
        "train_samples_per_s": round(epochs * len(split.train) / rows[-1]["time_s"], 1)
        if rows and rows[-1]["time_s"] > 0
        else None,
    }
    confusion_png = None
    if model.confusion is not None:
        from descent.plots import confusion_matrix

        confusion_png = confusion_matrix(model.confusion.numpy(), run_dir / "confusion_matrix.png")
    close_loggers(trainer.loggers, results, confusion_png)
    return results


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Validate, read the source, split it (stratified on `data.stratify_by`, by `data.group_by`), and fit: one
    split, or the k folds of `cv.folds` (each a run folder `fold_<i>/`)."""
    import pytorch_lightning as pl

    from descent.crossval import cross_validate
    from descent.data.sources import build_source
    from descent.data.splits import make_splits

    validate(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    source = build_source(cfg.data)
    columns = {name: source.column(name) for name in cfg.data.stratify_by}
    groups = source.column(cfg.data.group_by) if cfg.data.group_by else None
    splits = make_splits(len(source.labels), columns, tuple(cfg.data.split), cfg.seed, cfg.cv.folds, groups)
    if cfg.cv.folds:
        return cross_validate(cfg, source, splits, run_dir, fit_and_test)
    return fit_and_test(cfg, source, splits[0], run_dir)


def run(cfg: DictConfig) -> dict[str, Any]:
    """One Hydra job: train, then write results.json whatever happened (ok, diverged, failed or interrupted)."""
    quiet_lightning()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    results: dict[str, Any] = {"status": "failed", "error": None, "overrides": task_overrides()}
    with recorded(run_dir / "results.json", results):
        try:
            cfg, results["overrides"] = resumed_config(cfg, results["overrides"], run_dir)
            results |= train(cfg, run_dir)
        except Interrupted as stop:
            log.warning("interrupted: %s; resume with: python train.py ckpt_path=%s hydra.run.dir=%s",
                        stop, stop.last_checkpoint, run_dir)  # fmt: skip
            raise
    metrics = results["metrics"]
    log.info(
        "%s: test/acc=%.4f val/acc=%.4f (best epoch %s of %d, %d steps) -> %s",
        results["status"], metrics.get("test/acc", float("nan")), metrics.get("val/acc", float("nan")),
        results["best_epoch"], results["epochs"], results["steps"], run_dir / "results.json",
    )  # fmt: skip
    return results


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_job(cfg: DictConfig) -> float | None:
    """One job of a sweep (-m). It never raises an error, so that the sweep goes on: a failed job is recorded as
    `failed` in its results.json, returns None (a failed trial for Optuna), and makes the sweep's exit code non-zero
    when it ends (descent.sweep.SweepSummary). A job whose folder already holds its finished results (a sweep re-run
    into the same hydra.sweep.dir) is skipped unless skip_done=false. Ctrl-C stops the whole sweep."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    done = finished_results(run_dir, task_overrides()) if cfg.get("skip_done") is True else None
    if done is not None:
        log.info("skipped: %s says %s already (skip_done=false runs it again)", run_dir / "results.json",
                 done["status"])  # fmt: skip
        return objective(done)
    try:
        with one_gpu_per_job(cfg, Path(hydra_cfg.sweep.dir)):
            return objective(run(cfg))
    except ConfigError as error:
        log.error("%s", error)
    except Exception:
        log.exception("the job failed (recorded in %s); the sweep goes on", run_dir / "results.json")
    except BaseException:  # Ctrl-C or a signal: the whole sweep stops here
        write_summary(Path(hydra_cfg.sweep.dir))
        log.warning("sweep stopped: its summary so far is in %s; the same command with hydra.sweep.dir=%s "
                    "finishes it (finished jobs are skipped)", hydra_cfg.sweep.dir, hydra_cfg.sweep.dir)  # fmt: skip
        raise
    return None


@contextlib.contextmanager
def one_gpu_per_job(cfg: DictConfig, sweep_dir: Path) -> Iterator[None]:
    """Parallel single-GPU jobs (hydra/launcher=joblib) on a machine with several GPUs each take a GPU of their own
    (trainer.devices=[i]) for as long as they run; anywhere else, nothing changes."""
    gpus = torch.cuda.device_count()
    parallel = "joblib" in str(HydraConfig.get().launcher.get("_target_", ""))
    if not (parallel and gpus > 1 and cfg.trainer.get("devices") == 1 and cfg.trainer.get("accelerator") != "cpu"):
        yield
        return
    with claim_gpu(sweep_dir / ".gpus", gpus) as index, open_dict(cfg):
        cfg.trainer.devices = [index]
        log.info("this job runs on GPU %d of %d", index, gpus)
        yield


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@exit_on_config_error
@exit_on_interrupt
def main(cfg: DictConfig) -> float | None:
    """`python train.py [OVERRIDES]`: one run; returns the best val/acc (what a sweeper maximizes).
    Inside a sweep (-m), each job runs through `sweep_job`."""
    freeze_heap()
    if in_sweep():
        return sweep_job(cfg)
    return run(cfg)["metrics"].get("val/acc")

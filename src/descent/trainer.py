"""The Trainer of a run and what goes into it: its callbacks (the run's own, then `callbacks.*`), loggers, plugins and
profiler, torch's thread count, and the process set-up (quiet logs, a frozen heap, a clean environment).

`scripts/bench.py` builds its Trainer here too, so that it measures what a user's run gets.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.profilers import PassThroughProfiler

from descent import unset_empty_variables as unset_empty_variables  # train and eval call it first
from descent.callbacks import EpochHistory, FinishWandbOnError, GracefulStop, RunState, StepLosses
from descent.config import UNSHOWN, ConfigError
from descent.results import task_overrides

log = logging.getLogger("descent")
MULTI_THREAD_WORK = 10_000_000  # multiply-adds per step from which a second thread pays on these small models
LIGHTNING = ("pytorch_lightning", "lightning_fabric")  # Lightning's packages, as they lie on disk
SPAWNING = ("spawn", "fork", "notebook")  # Lightning strategies whose processes are started by multiprocessing


def quiet_lightning() -> None:
    """Drop lines that say nothing about the run: Lightning's advert for its cloud service, a deprecation warning
    raised inside Lightning by this torch version, its advice to sync metrics that torchmetrics has already synced
    across devices, its note that a limit of 1.0 uses every batch (what descent passes where its loaders apply a
    fraction)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`")  # a diverged step, on purpose
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(.*sync_dist=True\)")
    quiet = ("Tip:", "was configured so 100% of the batches")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: not any(text in record.getMessage() for text in quiet)
    )


def freeze_heap() -> None:
    """Move the objects alive now (mostly those importing torch and Lightning leaves) out of the garbage collector's
    sight: Python's exit would run full collections that traverse them all. Before a later job of the same process
    (a sweep) it first collects what the previous job left."""
    if gc.get_freeze_count():
        gc.collect()  # cheap: the frozen objects are skipped
    gc.freeze()


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by OMP_NUM_THREADS when set (joblib's workers get
    cores // jobs there, so that parallel jobs split the cores instead of fighting over them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(cores, int(cap)) if cap.isdigit() and int(cap) > 0 else cores


def multiply_adds(model: torch.nn.Module, input_shape: list[int]) -> int:
    """The multiply-adds of one sample's forward pass (torch's FLOP counter, halved)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    return counter.get_total_flops() // 2


def set_threads(threads: int | str, batch_size: int, model: torch.nn.Module, input_shape: list[int]) -> int:
    """torch's intra-op threads: `auto` picks them from the work of one step, batch size x one sample's
    multiply-adds: below MULTI_THREAD_WORK one thread (splitting such small operations costs more than it gains),
    every core above it."""
    work = batch_size * multiply_adds(model, input_shape) if threads == "auto" else 0
    count = threads if threads != "auto" else 1 if work < MULTI_THREAD_WORK else available_cores()
    torch.set_num_threads(int(count))
    return int(count)


class NoProfiler(PassThroughProfiler):
    """What `trainer.profiler: null` gets: no profiling, at no cost. Lightning wraps each hook call in
    `profiler.profile(name)`, and its do-nothing PassThroughProfiler opens a generator-based context manager there;
    this one hands back one shared `nullcontext`."""

    NO_CONTEXT = contextlib.nullcontext()

    def profile(self, action_name: str) -> Any:
        return self.NO_CONTEXT


def plugins() -> list[Any]:
    """The Trainer's plugins: atomic checkpoint files written in the background and, on SLURM, Lightning's requeue
    turned off: a requeue is submitit's (hydra/launcher=submitit_slurm), which starts the same job again in its
    folder, and that resumes it. Both would requeue the job twice."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    from descent.checkpoints import BackgroundCheckpointIO

    return [BackgroundCheckpointIO(), *([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [])]


def run_state(cfg: DictConfig) -> RunState:
    """A RunState for this run: its config as plain containers, interpolations left unresolved, `ckpt_path` null,
    and the Hydra overrides that made it (none outside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig

    container = OmegaConf.to_container(cfg, resolve=False)
    container["ckpt_path"] = None
    return RunState(container, task_overrides() if HydraConfig.initialized() else [])


def build_callbacks(cfg: DictConfig | None, run_dir: Path, has_logger: bool) -> list[Any]:
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
        saves = issubclass(get_class(callback_cfg["_target_"]), ModelCheckpoint)
        callbacks.append(instantiate(callback_cfg, **({"dirpath": run_dir / "checkpoints"} if saves else {})))
    return callbacks


def loader_fractions(trainer_cfg: DictConfig) -> dict[str, float]:
    """The parts (train, val, test) whose `trainer.limit_*_batches` (for train and val: `trainer.overfit_batches`,
    which Lightning applies to both) is a fraction in (0, 1). Our loaders keep those batches themselves
    (descent.data.batches.limited_bounds: Lightning's count, and a fraction of the samples where that count is 0,
    which Lightning refuses), and Lightning is given 1.0 for them (`lightning_limits`)."""
    overfit = trainer_cfg.get("overfit_batches") or 0
    fractions = {}
    for part in ("train", "val", "test"):
        value = overfit if overfit and part != "test" else trainer_cfg.get(f"limit_{part}_batches")
        if isinstance(value, float) and 0 < value < 1:
            fractions[part] = value
    return fractions


def lightning_limits(trainer_cfg: DictConfig) -> dict[str, float]:
    """The Trainer arguments that hand the fractions of `loader_fractions` to our loaders: 1.0 for those parts."""
    fractions = loader_fractions(trainer_cfg)
    if trainer_cfg.get("overfit_batches") and "train" in fractions:
        return {"overfit_batches": 1.0, **({"limit_test_batches": 1.0} if "test" in fractions else {})}
    return {f"limit_{part}_batches": 1.0 for part in fractions}


@contextlib.contextmanager
def setting_errors(cfg: DictConfig, building: bool = False) -> Iterator[None]:
    """Turn an exception that Lightning, Hydra's instantiate, torch or wandb raise about a setting into a
    ConfigError naming the setting, with their own message on one line. While `building` the Trainer, every
    exception is about its settings; later (fit, test) only Lightning's MisconfigurationException, torch's refusal of
    `trainer.deterministic`, wandb's errors and a ValueError or TypeError raised by Lightning's own code (such as its
    check of `val_check_interval` against the epoch's batches) are: anything else stays a failure with its traceback."""
    from hydra.errors import InstantiationException
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except ConfigError:
        raise
    except Exception as error:
        cause = error.__cause__ if isinstance(error, InstantiationException) and error.__cause__ else error
        message = " ".join(str(cause).split())
        wandb_errors = getattr(sys.modules.get("wandb"), "errors", None)
        settings_check = type(cause).__module__.startswith("pydantic") and raised_in(cause, ("wandb",))
        if wandb_errors is not None and (isinstance(cause, wandb_errors.Error) or settings_check):
            raise wandb_setting(cfg, cause, message) from error
        lightning_check = isinstance(cause, (ValueError, TypeError)) and raised_in(cause, LIGHTNING, innermost=True)
        if building or isinstance(cause, MisconfigurationException) or lightning_check:
            raise named_setting(cfg, message) from error
        if isinstance(cause, RuntimeError) and "deterministic" in message:
            raise ConfigError("trainer.deterministic", cfg.trainer.get("deterministic"), message) from error
        raise


def raised_in(error: BaseException, packages: Sequence[str], innermost: bool = False) -> bool:
    """Whether one of `packages` is on `error`'s traceback (with `innermost`, raised there: a check of its own)."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ is not None else []
    frames = frames[-1:] if innermost else frames
    return any(f"{os.sep}{package}{os.sep}" in frame.filename for frame in frames for package in packages)


def wandb_setting(cfg: DictConfig, error: BaseException, message: str) -> ConfigError:
    """A ConfigError for wandb's refusal of a setting: the WANDB_<FIELD> variable or `logger.wandb.<field>` that
    set the field its pydantic check names, else `logger.wandb`."""
    fields = [str(entry["loc"][0]) for entry in getattr(error, "errors", list)() if entry.get("loc")]
    for field in fields:
        if f"WANDB_{field.upper()}" in os.environ:
            return ConfigError(f"WANDB_{field.upper()}", os.environ[f"WANDB_{field.upper()}"], message)
        if OmegaConf.select(cfg, f"logger.wandb.{field}") is not None:
            return ConfigError(f"logger.wandb.{field}", OmegaConf.select(cfg, f"logger.wandb.{field}"), message)
    return ConfigError("logger.wandb", UNSHOWN, message)


def named_setting(cfg: DictConfig, message: str) -> ConfigError:
    """A ConfigError for `message`, naming the first setting of trainer.*, callbacks.* or logger.* it mentions (as a
    word; else the first whose string value it mentions), else `trainer`."""
    settings = {f"trainer.{key}": key for key in cfg.trainer}
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            settings |= {f"{group}.{name}.{key}": key for key in (node or {}) if not str(key).startswith("_")}
    mentions = []  # (names it rather than its value, where the message names it, a trainer setting first, setting)
    for setting, key in settings.items():
        value = OmegaConf.select(cfg, setting)
        words = [(0, str(key))] + ([(1, value)] if isinstance(value, str) and len(value) > 1 else [])
        for by_value, word in words:
            if match := re.search(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", message, re.IGNORECASE):
                mentions.append((by_value, match.start(), not setting.startswith("trainer."), setting))
    if not mentions:
        return ConfigError("trainer", UNSHOWN, message)
    setting = min(mentions)[-1]
    return ConfigError(setting, OmegaConf.select(cfg, setting), message)


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    history: EpochHistory,
    stopper: GracefulStop,
    group: str | None = None,
    job_type: str = "train",
    in_sweep: bool = False,
    extra: Sequence[Any] = (),
) -> Any:
    """The Trainer of one model: `extra` first, then the epoch history and the step losses, then what
    `trainer_with` adds."""
    own = [*extra, history, StepLosses(run_dir / "steps.csv")]
    return trainer_with(cfg, run_dir, own, stopper, cfg.callbacks, group, job_type, in_sweep)


def trainer_with(
    cfg: DictConfig,
    run_dir: Path,
    own: Sequence[Any],
    stopper: GracefulStop,
    callbacks_cfg: DictConfig | None,
    group: str | None = None,
    job_type: str = "train",
    in_sweep: bool = False,
) -> Any:
    """The Trainer of `trainer.*`: the run's own recording callbacks (`own`), W&B's finish on error, the run state,
    the signal stopper, then those of `callbacks_cfg`; the loggers of `logger.*`, the checkpoint plugins, and with
    `trainer.profiler: null` a profiler that costs nothing."""
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar

    from descent.loggers import build_loggers

    with setting_errors(cfg, building=True):
        loggers = build_loggers(cfg, run_dir, group, job_type)
        callbacks = [
            *own,
            FinishWandbOnError(stopper),
            run_state(cfg),
            stopper,
            *build_callbacks(callbacks_cfg, run_dir, has_logger=bool(loggers)),
        ]
    with setting_errors(cfg, building=True):
        trainer = instantiate(
            cfg.trainer,
            callbacks=callbacks,
            profiler=cfg.trainer.get("profiler") or NoProfiler(),
            plugins=plugins(),
            logger=loggers or False,
            default_root_dir=str(run_dir),
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
            enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
            **lightning_limits(cfg.trainer),
        )
    check_distributed(trainer, cfg.trainer, in_sweep)
    return trainer


def check_distributed(trainer: Any, trainer_cfg: DictConfig, in_sweep: bool) -> None:
    """Refuse the multi-process set-ups that Lightning would run wrongly here, naming what to use instead.

    Lightning's `ddp` re-launches this script once a device: under Hydra's -m that re-runs the whole sweep (a second
    sweep folder; with Optuna the ranks train different hyperparameters), and under submitit it re-runs submitit's
    own script (Lightning issue 11300). Spawned processes (`ddp_spawn`) keep the run's epochs to themselves.
    On SLURM (hydra/launcher=submitit_slurm with one task a device) the tasks are the ranks: nothing re-launches.
    """
    from pytorch_lightning.accelerators import CPUAccelerator

    strategy = trainer_cfg.get("strategy", "auto")
    named = strategy if isinstance(strategy, str) else str(strategy.get("start_method", ""))
    if any(word in named for word in SPAWNING):
        allowed = (
            "expected ddp (trainer=ddp): spawned processes keep the epochs, steps and divergence of the run to "
            "themselves, so results.json would miss them"
        )
        raise ConfigError("trainer.strategy", strategy, allowed)
    environment = getattr(trainer.strategy, "cluster_environment", None)
    relaunches = trainer.world_size > 1 and not (environment and environment.creates_processes_externally)
    if in_sweep and relaunches:
        allowed = (
            f"expected one device a job inside a sweep (-m), not {trainer.num_devices}: Lightning's ddp re-launches "
            "the script, which re-runs the whole sweep (Lightning issue 11300). Use one run per command (python "
            "train.py trainer=ddp ...), single-device jobs (one GPU each with hydra/launcher=joblib), or "
            "hydra/launcher=submitit_slurm with hydra.launcher.tasks_per_node equal to trainer.devices"
        )
        raise ConfigError("trainer.strategy", strategy, allowed)
    if trainer.num_nodes > 1 and not (environment and environment.creates_processes_externally):
        allowed = (
            "expected 1 here: several nodes need a cluster that starts a process on each (SLURM: "
            "hydra/launcher=submitit_slurm with hydra.launcher.nodes, or torchrun); alone, the run would wait for "
            "the other nodes forever"
        )
        raise ConfigError("trainer.num_nodes", trainer.num_nodes, allowed)
    if trainer_cfg.get("sync_batchnorm") and isinstance(trainer.accelerator, CPUAccelerator):
        allowed = (
            "expected false on CPU: torch's SyncBatchNorm runs on GPUs only (use trainer.accelerator=gpu, or "
            "sync_batchnorm=false: each device normalizes its own batch)"
        )
        raise ConfigError("trainer.sync_batchnorm", True, allowed)

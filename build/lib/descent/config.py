"""The one validation layer: every key a run reads is checked here, before any data is touched or model built.

A bad value raises `ConfigError`, whose message names the key, the value and what is allowed. Nothing here fixes
a value silently. Checks that need the data (batch size against the training split) live in `check_batch_size`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig

ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "silu", "tanh", "sigmoid")
MAX_SEED = 2**32 - 1  # numpy's seeds are uint32; Lightning refuses larger ones with a traceback
OPTIMIZER_FLAGS = ("nesterov", "amsgrad", "centered", "maximize", "foreach", "fused", "capturable", "differentiable")


class ConfigError(ValueError):
    """A config value that is not allowed: `key=value: what is allowed`."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={_show(value)} is not allowed: {allowed}")


def _show(value: Any) -> str:
    if isinstance(value, (ListConfig, DictConfig)):
        from omegaconf import OmegaConf

        return str(OmegaConf.to_container(value))
    return repr(value) if isinstance(value, str) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(cfg: DictConfig, key: str, ok: Callable[[Any], bool], allowed: str) -> None:
    """Check `cfg[key]` (dotted) when present."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return
        node = node[part]
    if not ok(node):
        raise ConfigError(key, node, allowed)


def _in_unit(lo_open: bool, hi_open: bool) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if not _is_number(v):
            return False
        return (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)

    return ok


def _positive_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _non_negative(v: Any) -> bool:
    return _is_number(v) and v >= 0


def _is_list(v: Any) -> bool:
    return isinstance(v, (ListConfig, Sequence)) and not isinstance(v, str)


def _fractions(v: Any) -> bool:
    return (
        isinstance(v, (ListConfig, Sequence))
        and len(v) == 3
        and all(_is_number(f) and 0 < f < 1 for f in v)
        and abs(sum(v) - 1.0) < 1e-6
    )


def validate(cfg: DictConfig) -> None:
    """Raise `ConfigError` on the first value a run must not start with."""
    _check(cfg, "seed", lambda v: _is_int(v) and 0 <= v <= MAX_SEED, f"expected an int in [0, {MAX_SEED}]")
    _check(cfg, "ckpt_path", lambda v: v is None or isinstance(v, str), "expected null or a checkpoint's path")
    _check(cfg, "threads", lambda v: v == "auto" or _positive_int(v), "expected 'auto' or a positive int")
    _check(cfg, "skip_done", lambda v: isinstance(v, bool), "expected true or false")
    _check(cfg, "cv.folds", lambda v: _is_int(v) and (v == 0 or v >= 2), "expected 0 (off) or an int >= 2")
    _check(
        cfg,
        "cv.fold",
        lambda v: v is None or (_is_int(v) and 0 <= v < cfg.cv.folds),
        "expected null (every fold) or a fold number in [0, cv.folds), with cv.folds >= 2",
    )
    _check(
        cfg,
        "ckpt_path",
        lambda v: v is None or not cfg.cv.folds or cfg.cv.get("fold") is not None,
        "a checkpoint resumes one fold: add cv.fold=i (and hydra.run.dir=<the CV run's folder>)",
    )

    _check(cfg, "data.batch_size", lambda v: v == "full" or _positive_int(v), "expected a positive int or 'full'")
    _check(cfg, "data.eval_batch_size", _positive_int, "expected a positive int")
    _check(cfg, "data.split", _fractions, "expected 3 fractions in (0, 1) (train, val, test) that sum to 1")
    _check(
        cfg,
        "data.stratify_by",
        lambda v: _is_list(v) and all(isinstance(c, str) for c in v),
        "expected a list of column names, e.g. [label] or [label,sex]",
    )
    _check(
        cfg,
        "data.group_by",
        lambda v: v is None or isinstance(v, str),
        "expected null or a metadata column name",
    )

    _check(cfg, "data.n_samples", _positive_int, "expected a positive int")
    _check(cfg, "data.image_size", _positive_int, "expected a positive int (images are image_size x image_size)")
    _check(cfg, "data.num_classes", lambda v: _is_int(v) and v >= 2, "expected an int >= 2")
    _check(cfg, "data.chunk_size", _positive_int, "expected a positive int")
    _check(cfg, "data.stream.in_memory_mb", lambda v: _is_number(v) and v >= 0, "expected a size in MB >= 0")
    _check(cfg, "data.stream.block_size", _positive_int, "expected a positive int (samples)")
    _check(cfg, "data.stream.prefetch", _positive_int, "expected a positive int (batches)")

    _check(
        cfg,
        "model.hidden_dims",
        lambda v: _is_list(v) and all(_positive_int(d) for d in v),
        "expected a list of positive ints, e.g. [256,256] (or [] for a linear model)",
    )
    _check(cfg, "model.batch_norm", lambda v: isinstance(v, bool), "expected true or false")
    _check(cfg, "model.dropout", _in_unit(lo_open=False, hi_open=True), "expected a probability p in [0, 1)")
    _check(cfg, "model.activation", lambda v: v in ACTIVATIONS, f"expected one of {', '.join(ACTIVATIONS)}")

    _check(cfg, "optimizer.lr", lambda v: _is_number(v) and v > 0, "expected a finite learning rate > 0")
    _check(cfg, "optimizer.momentum", _in_unit(lo_open=False, hi_open=True), "expected b in [0, 1)")
    _check(cfg, "optimizer.dampening", _in_unit(lo_open=False, hi_open=False), "expected a value in [0, 1]")
    _check(cfg, "optimizer.alpha", _in_unit(lo_open=False, hi_open=True), "expected b in [0, 1)")
    _check(
        cfg,
        "optimizer.betas",
        lambda v: _is_list(v) and len(v) == 2 and all(_in_unit(False, True)(b) for b in v),
        "expected [b1, b2], each in [0, 1)",
    )
    _check(
        cfg,
        "optimizer.eps",
        lambda v: _is_number(v) and v > 0,
        "expected eps > 0 (eps = 0 divides by zero where a gradient is exactly 0, as on constant pixels)",
    )
    _check(cfg, "optimizer.weight_decay", _non_negative, "expected a finite value >= 0")
    for flag in OPTIMIZER_FLAGS:
        _check(cfg, f"optimizer.{flag}", lambda v: v is None or isinstance(v, bool), "expected true, false or null")

    _check(cfg, "trainer.max_epochs", _positive_int, "expected a positive int")
    _check(cfg, "trainer.min_epochs", lambda v: _is_int(v) and v >= 0, "expected an int >= 0")
    _check(
        cfg,
        "trainer.devices",
        lambda v: (
            v == "auto" or _positive_int(v) or (_is_list(v) and len(v) > 0 and all(_is_int(d) and d >= 0 for d in v))
        ),
        "expected 'auto', a positive int, or a list of device indices",
    )
    _check(cfg, "trainer.num_sanity_val_steps", lambda v: _is_int(v) and v >= -1, "expected an int >= -1")
    _check(cfg, "trainer.log_every_n_steps", _positive_int, "expected a positive int")
    _check(cfg, "trainer.gradient_clip_val", lambda v: v is None or _non_negative(v), "expected null or a value >= 0")
    _check(cfg, "trainer.accumulate_grad_batches", _positive_int, "expected a positive int")
    _check(
        cfg,
        "trainer.deterministic",
        lambda v: v is None or isinstance(v, bool) or v == "warn",
        "expected true, false, 'warn' or null",
    )
    _check(
        cfg,
        "trainer.check_val_every_n_epoch",
        lambda v: v == 1,
        "expected 1: the best epoch is chosen on val",
    )
    _check(
        cfg,
        "trainer.val_check_interval",
        lambda v: v in (None, 1, 1.0),
        "expected 1.0 (validate every epoch)",
    )
    _check(cfg, "callbacks.early_stopping.patience", lambda v: _is_int(v) and v >= 0, "expected an int >= 0")
    _check(cfg, "callbacks.early_stopping.min_delta", _non_negative, "expected a finite value >= 0")
    for callback in ("early_stopping", "model_checkpoint"):
        _check(cfg, f"callbacks.{callback}.mode", lambda v: v in ("min", "max"), "expected 'min' or 'max'")
        _check(cfg, f"callbacks.{callback}.monitor", lambda v: isinstance(v, str), "expected a logged metric's name")
    # after trainer: cosine's T_max follows trainer.max_epochs, whose own message names the key the user set
    _check(cfg, "scheduler.interval", lambda v: v in ("epoch", "step"), "expected 'epoch' or 'step'")
    _check(cfg, "scheduler.monitor", lambda v: isinstance(v, str), "expected a logged metric's name, e.g. val/loss")
    _check(
        cfg, "scheduler.scheduler.T_max", _positive_int, "expected a positive int (epochs of one cosine half-period)"
    )
    _check(cfg, "scheduler.scheduler.eta_min", _non_negative, "expected a finite learning rate >= 0")
    _check(cfg, "scheduler.scheduler.step_size", _positive_int, "expected a positive int (epochs between decays)")
    _check(cfg, "scheduler.scheduler.gamma", lambda v: _is_number(v) and v > 0, "expected a finite factor > 0")
    _check(cfg, "scheduler.scheduler.factor", _in_unit(lo_open=True, hi_open=True), "expected a factor in (0, 1)")
    _check(cfg, "scheduler.scheduler.patience", lambda v: _is_int(v) and v >= 0, "expected an int >= 0")
    _check(cfg, "scheduler.scheduler.mode", lambda v: v in ("min", "max"), "expected 'min' or 'max'")


def check_batch_size(batch_size: int | str, n_train: int, batch_norm: bool) -> int:
    """The number of samples per training batch, refusing sizes the data or batch norm cannot take."""
    size = n_train if batch_size == "full" else int(batch_size)
    if size > n_train:
        raise ConfigError(
            "data.batch_size",
            batch_size,
            f"expected at most the training split's {n_train} samples, or 'full'",
        )
    if batch_norm and size == 1:
        raise ConfigError(
            "data.batch_size",
            batch_size,
            "batch norm needs at least 2 samples a batch: use data.batch_size>=2, or model.batch_norm=false "
            "for stochastic gradient descent",
        )
    return size


def check_distributed(trainer: Any, trainer_cfg: DictConfig, in_sweep: bool) -> None:
    """Refuse the multi-process set-ups that Lightning would run wrongly here, naming what to use instead.

    Lightning's `ddp` re-launches this script once a device: under Hydra's -m that re-runs the whole sweep (a second
    sweep folder; with Optuna the ranks train different hyperparameters), and under submitit it re-runs submitit's
    own script (Lightning issue 11300). Spawned processes (`ddp_spawn`) keep the run's epochs to themselves.
    On SLURM (hydra/launcher=submitit_slurm with one task a device) the tasks are the ranks: nothing re-launches.
    """
    from pytorch_lightning.accelerators import CPUAccelerator
    from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher

    strategy = trainer_cfg.get("strategy", "auto")
    launcher = trainer.strategy.launcher
    if isinstance(launcher, _MultiProcessingLauncher):
        raise ConfigError(
            "trainer.strategy", strategy, "expected ddp (trainer=ddp): spawned processes keep the epochs, steps and "
            "divergence of the run to themselves, so results.json would miss them",
        )  # fmt: skip
    if in_sweep and isinstance(launcher, _SubprocessScriptLauncher):
        raise ConfigError(
            "trainer.strategy", strategy, f"expected one device a job inside a sweep (-m), not "
            f"{trainer.num_devices}: Lightning's ddp re-launches the script, which re-runs the whole sweep (Lightning "
            "issue 11300). Use one run per command (python train.py trainer=ddp ...), single-device jobs (one GPU "
            "each with hydra/launcher=joblib), or hydra/launcher=submitit_slurm with hydra.launcher.tasks_per_node "
            "equal to trainer.devices",
        )  # fmt: skip
    if trainer_cfg.get("sync_batchnorm") and isinstance(trainer.accelerator, CPUAccelerator):
        raise ConfigError(
            "trainer.sync_batchnorm", True, "expected false on CPU: torch's SyncBatchNorm runs on GPUs only "
            "(use trainer.accelerator=gpu, or sync_batchnorm=false: each device normalizes its own batch)",
        )  # fmt: skip


def exit_on_config_error(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Turn a `ConfigError` into one logged line and exit code 2 (a traceback only with HYDRA_FULL_ERROR=1)."""
    import functools
    import logging
    import os
    import sys

    @functools.wraps(run)
    def wrapper(cfg: Any) -> Any:
        try:
            return run(cfg)
        except ConfigError as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            logging.getLogger("descent").error("%s", error)
            sys.exit(2)

    return wrapper

"""The schema of every config group, and the one validation layer: every key a run reads is checked here, before any
data is touched or a model built.

It fails closed: a key the schema does not know, or one it expects and does not find, is an error, as is any value
out of range. Groups with a `_target_` (model, optimizer, scheduler, trainer, callbacks, logger) accept exactly the
arguments of what they instantiate (its signature is their schema); the others accept the keys of the tables below
(data sources declare theirs in `descent.data.sources.SCHEMAS`). A bad value raises `ConfigError`, whose message
names the key, the value and what is allowed; nothing here fixes a value silently. Checks that need the data (the
batch size against the training split) live in `check_batch_size`.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

MAX_SEED = 2**32 - 1  # numpy's seeds are uint32; Lightning refuses larger ones with a traceback
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_args_", "_convert_", "_recursive_"})
MISSING = object()  # a key that is absent
UNSHOWN = object()  # a value an error message does not show (a whole group, or one held by a library)


class ConfigError(ValueError):
    """A config value that is not allowed: `key=value is not allowed: what is allowed` (or `key is missing: ...`, or
    `key: why`)."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        shown = (
            f"{key} is missing"
            if value is MISSING
            else key
            if value is UNSHOWN
            else f"{key}={_show(value)} is not allowed"
        )
        super().__init__(f"{shown}: {allowed}")


def _show(value: Any) -> str:
    if isinstance(value, (ListConfig, DictConfig)):
        return str(OmegaConf.to_container(value))
    return repr(value) if isinstance(value, str) else str(value)


# ---- predicates: what a value may be


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: Any) -> bool:
    return is_int(value) and value > 0


def non_negative_int(value: Any) -> bool:
    return is_int(value) and value >= 0


def non_negative(value: Any) -> bool:
    return is_number(value) and value >= 0


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def is_str(value: Any) -> bool:
    return isinstance(value, str)


def is_list(value: Any) -> bool:
    return isinstance(value, (ListConfig, list, tuple))


def in_unit(lo_open: bool, hi_open: bool) -> Callable[[Any], bool]:
    """A number in [0, 1], each end open or closed."""

    def ok(value: Any) -> bool:
        return is_number(value) and (value > 0 if lo_open else value >= 0) and (value < 1 if hi_open else value <= 1)

    return ok


def null_or(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or ok(value)


def one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda value: not isinstance(value, bool) and value in choices


def list_of(ok: Callable[[Any], bool], length: int | None = None) -> Callable[[Any], bool]:
    return lambda value: is_list(value) and (length is None or len(value) == length) and all(map(ok, value))


def fractions(value: Any) -> bool:
    """Three fractions in (0, 1) that sum to 1: train, val and test."""
    return list_of(in_unit(True, True), 3)(value) and abs(sum(value) - 1.0) < 1e-6


@dataclass(frozen=True)
class Rule:
    """What one key accepts: `ok(value)` is true, as `allowed` says in words; `required` keys must be present."""

    ok: Callable[[Any], bool]
    allowed: str
    required: bool = True


Schema = Mapping[str, Rule]

TOP: Schema = {
    "task_name": Rule(is_str, "expected a name"),
    "seed": Rule(lambda v: is_int(v) and 0 <= v <= MAX_SEED, f"expected an int in [0, {MAX_SEED}]"),
    "threads": Rule(lambda v: v == "auto" or positive_int(v), "expected 'auto' or a positive int"),
    "ckpt_path": Rule(null_or(is_str), "expected null or a checkpoint's path"),
    "skip_done": Rule(is_bool, "expected true or false"),
    "tags": Rule(list_of(is_str), "expected a list of labels, e.g. [baseline,course]"),
    "replicates": Rule(positive_int, "expected a positive int (models of this setting, seeds seed..seed+k-1)"),
    "replicates_vectorized": Rule(is_bool, "expected true (the replicates trained at once) or false (one by one)"),
    "lr_find": Rule(is_bool, "expected true (search the lr before fit, then train with it) or false"),
}
TRAIN_GROUPS = (
    *("cv", "target", "compare", "data", "model", "optimizer", "scheduler", "trainer", "callbacks", "logger", "paths"),
)
EVAL_GROUPS = ("trainer", "logger", "paths")
PREDICT_GROUPS = ("trainer", "paths")
CHECKPOINT = "expected the path of a checkpoint file (.ckpt)"
PREDICT: Schema = {
    "images": Rule(is_str, "expected a .npy of images (N,H,W) or (N,C,H,W), or a folder of image files"),
    "batch_size": Rule(positive_int, "expected a positive int (images a batch)"),
}
CV: Schema = {
    "folds": Rule(lambda v: is_int(v) and (v == 0 or v >= 2), "expected 0 (off) or an int >= 2"),
    "fold": Rule(lambda v: v is None or (is_int(v) and v >= 0), "expected null (every fold) or a fold number"),
}
TARGET: Schema = {
    "val_acc": Rule(in_unit(True, False), "expected a validation accuracy in (0, 1] (the run's convergence target)"),
}
COMPARE: Schema = {
    "metric": Rule(
        one_of("val/acc", "val/loss", "val/f1", "to_target/seconds", "to_target/steps"),
        "expected val/acc, val/loss, val/f1, to_target/seconds or to_target/steps (a test metric never chooses)",
    ),
    "alpha": Rule(in_unit(True, True), "expected a level in (0, 1), e.g. 0.05"),
}
PATHS = ("root_dir", "log_dir", "output_dir")  # folders, read where they are used (output_dir is Hydra's)
DATA: Schema = {
    "name": Rule(is_str, "expected the name of a data source"),
    "batch_size": Rule(lambda v: v == "full" or positive_int(v), "expected a positive int or 'full'"),
    "eval_batch_size": Rule(positive_int, "expected a positive int"),
    "split": Rule(fractions, "expected 3 fractions in (0, 1) (train, val, test) that sum to 1"),
    "split_seed": Rule(lambda v: is_int(v) and 0 <= v <= MAX_SEED, f"expected an int in [0, {MAX_SEED}]"),
    "stratify_by": Rule(list_of(is_str), "expected a list of column names, e.g. [label] or [label,sex]"),
    "group_by": Rule(null_or(is_str), "expected null or a metadata column name"),
}
STREAM: Schema = {
    "in_memory_mb": Rule(non_negative, "expected a size in MB >= 0"),
    "block_size": Rule(positive_int, "expected a positive int (samples)"),
    "prefetch": Rule(positive_int, "expected a positive int (batches)"),
}
# Range checks of `_target_` groups, for the arguments they have (which arguments they have is their signature's)
MODEL: Schema = {
    "hidden_dims": Rule(
        list_of(positive_int), "expected a list of positive ints, e.g. [256,256] (or [] for a linear model)"
    ),
    "channels": Rule(list_of(positive_int), "expected a list of positive ints, e.g. [32,64] (one conv block each)"),
    "batch_norm": Rule(is_bool, "expected true or false"),
    "dropout": Rule(in_unit(False, True), "expected a probability p in [0, 1)"),
}
OPTIMIZER: Schema = {
    "lr": Rule(lambda v: is_number(v) and v > 0, "expected a finite learning rate > 0"),
    "momentum": Rule(in_unit(False, True), "expected b in [0, 1)"),
    "dampening": Rule(in_unit(False, False), "expected a value in [0, 1]"),
    "alpha": Rule(in_unit(False, True), "expected b in [0, 1)"),
    "betas": Rule(list_of(in_unit(False, True), 2), "expected [b1, b2], each in [0, 1)"),
    "eps": Rule(
        lambda v: is_number(v) and v > 0,
        "expected eps > 0 (eps = 0 divides by zero where a gradient is exactly 0, as on constant pixels)",
    ),
    "weight_decay": Rule(non_negative, "expected a finite value >= 0"),
    **{
        flag: Rule(null_or(is_bool), "expected true, false or null")
        for flag in ("nesterov", "amsgrad", "centered", "maximize", "foreach", "fused", "capturable", "differentiable")
    },
}
SCHEDULER: Schema = {  # Lightning's lr_scheduler dict, around the torch scheduler of its `scheduler` key
    "scheduler": Rule(lambda v: isinstance(v, DictConfig), "expected a torch scheduler's _target_ config"),
    "interval": Rule(one_of("epoch", "step"), "expected 'epoch' or 'step'", required=False),
    "frequency": Rule(positive_int, "expected a positive int", required=False),
    "monitor": Rule(is_str, "expected a logged metric's name, e.g. val/loss", required=False),
    "strict": Rule(is_bool, "expected true or false", required=False),
    "name": Rule(null_or(is_str), "expected null or a name", required=False),
}
TORCH_SCHEDULER: Schema = {
    "T_max": Rule(positive_int, "expected a positive int (epochs of one cosine half-period)"),
    "eta_min": Rule(non_negative, "expected a finite learning rate >= 0"),
    "step_size": Rule(positive_int, "expected a positive int (epochs between decays)"),
    "gamma": Rule(lambda v: is_number(v) and v > 0, "expected a finite factor > 0"),
    "factor": Rule(in_unit(True, True), "expected a factor in (0, 1)"),
    "patience": Rule(lambda v: is_int(v) and v >= 0, "expected an int >= 0"),
    "mode": Rule(one_of("min", "max"), "expected 'min' or 'max'"),
}


def batch_limit(value: Any) -> bool:
    """A Lightning batch count or fraction: an int >= 0 (batches) or a float in [0, 1] (a fraction of them)."""
    return non_negative_int(value) or (isinstance(value, float) and 0 <= value <= 1)


def a_duration(value: Any) -> bool:
    """What Lightning takes as a time: "DD:HH:MM:SS" or a dict of timedelta's keys (days, hours, minutes...)."""
    return is_str(value) or (isinstance(value, DictConfig) and all(is_number(v) for v in value.values()))


LIMIT = "expected a batch count (an int >= 0) or a fraction in [0, 1]"
TRAINER: Schema = {
    "max_epochs": Rule(
        lambda v: positive_int(v) or (is_int(v) and v == -1),
        "expected a positive int (or -1 with trainer.max_steps or max_time)",
    ),
    "min_epochs": Rule(lambda v: v is None or (is_int(v) and v >= 0), "expected null or an int >= 0"),
    "max_steps": Rule(
        lambda v: positive_int(v) or (is_int(v) and v == -1), "expected a positive int, or -1 (no limit)"
    ),
    "min_steps": Rule(null_or(non_negative_int), "expected null or an int >= 0"),
    "max_time": Rule(null_or(a_duration), 'expected null, "DD:HH:MM:SS" or a dict such as {minutes: 30}'),
    "devices": Rule(
        lambda v: (
            v == "auto" or positive_int(v) or (is_list(v) and len(v) > 0 and all(is_int(d) and d >= 0 for d in v))
        ),
        "expected 'auto', a positive int, or a list of device indices",
    ),
    "num_nodes": Rule(positive_int, "expected a positive int"),
    "num_sanity_val_steps": Rule(lambda v: is_int(v) and v >= -1, "expected an int >= -1"),
    "log_every_n_steps": Rule(positive_int, "expected a positive int"),
    "gradient_clip_val": Rule(null_or(non_negative), "expected null or a value >= 0"),
    "gradient_clip_algorithm": Rule(null_or(one_of("norm", "value")), "expected null, 'norm' or 'value'"),
    "accumulate_grad_batches": Rule(positive_int, "expected a positive int"),
    "deterministic": Rule(lambda v: v is None or is_bool(v) or v == "warn", "expected true, false, 'warn' or null"),
    "check_val_every_n_epoch": Rule(
        null_or(positive_int),
        "expected a positive int, or null (with an int trainer.val_check_interval: every N steps)",
    ),
    "val_check_interval": Rule(
        lambda v: v is None or positive_int(v) or (isinstance(v, float) and 0 < v <= 1) or a_duration(v),
        'expected a fraction of an epoch in (0, 1], a number of training batches, or a time ("DD:HH:MM:SS")',
    ),
    "limit_train_batches": Rule(
        lambda v: v is None or (batch_limit(v) and v != 0), "expected batches (an int > 0) or a fraction in (0, 1]"
    ),
    "limit_val_batches": Rule(null_or(batch_limit), LIMIT),
    "limit_test_batches": Rule(null_or(batch_limit), LIMIT),
    "limit_predict_batches": Rule(null_or(batch_limit), LIMIT),
    "overfit_batches": Rule(batch_limit, LIMIT + " (0: off)"),
    "fast_dev_run": Rule(lambda v: is_bool(v) or non_negative_int(v), "expected true, false or a number of batches"),
    "barebones": Rule(
        lambda v: v is False,
        "expected false: barebones turns off self.log and the callbacks that write metrics.csv, results.json and "
        "the checkpoints (for a quick check use trainer.fast_dev_run=true)",
    ),
    "reload_dataloaders_every_n_epochs": Rule(non_negative_int, "expected an int >= 0"),
    **{
        flag: Rule(is_bool, "expected true or false")
        for flag in ("inference_mode", "use_distributed_sampler", "detect_anomaly", "enable_autolog_hparams")
    },
    **{flag: Rule(null_or(is_bool), "expected true, false or null") for flag in ("benchmark", "enable_model_summary")},
}
CALLBACK: Schema = {
    "patience": Rule(lambda v: is_int(v) and v >= 0, "expected an int >= 0"),
    "min_delta": Rule(non_negative, "expected a finite value >= 0"),
    "mode": Rule(one_of("min", "max"), "expected 'min' or 'max'"),
    "monitor": Rule(null_or(is_str), "expected null or a logged metric's name"),
}
# arguments a config of the group must set, though its target has a default for them (the course sets them all)
REQUIRED = {"optimizer": ("lr",), "trainer": ("max_epochs",)}
# arguments descent itself passes when it instantiates a group: a config must not set them
SUPPLIED = {
    "model": ("in_features", "input_shape", "num_classes"),
    "optimizer": ("params",),
    "scheduler": ("optimizer",),
    "trainer": ("callbacks", "logger", "plugins", "default_root_dir", "enable_checkpointing", "enable_progress_bar"),
    "callbacks": ("dirpath",),
    "logger": ("save_dir",),
}

INSTEAD = {  # what to set instead of an argument descent passes
    "trainer.callbacks": " (add a callback under callbacks.NAME with its _target_)",
    "trainer.logger": " (use logger=csv, tensorboard, wandb, a list, or none)",
    "trainer.default_root_dir": " (the run folder is hydra.run.dir)",
    "trainer.enable_checkpointing": " (use callbacks.model_checkpoint=null callbacks.last_checkpoint=null)",
    "trainer.enable_progress_bar": " (use callbacks.progress_bar=null)",
}


def value_of(node: DictConfig, key: str) -> Any:
    """`node[key]`, resolved, or MISSING."""
    if key not in node:
        return MISSING
    return node[key]


def shown(node: DictConfig, key: str) -> Any:
    """`node[key]` as an error message may show it: resolved, but for a value read from the environment
    (`${oc.env:...}`), shown as typed: a secret passed that way never reaches a log."""
    typed = OmegaConf.to_container(node, resolve=False).get(key)
    return typed if isinstance(typed, str) and "oc.env" in typed else node[key]


def typed_unless_secret(node: Any) -> Any:
    """A config node as plain containers, resolved, but for values written as `${oc.env:...}`, kept as typed: a
    secret passed through the environment must not reach W&B or a results file (as Hydra's own .hydra/config.yaml
    keeps them unresolved)."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return node

    def pick(raw: Any, resolved: Any) -> Any:
        if isinstance(raw, dict):
            return {key: pick(raw[key], resolved[key]) for key in raw}
        if isinstance(raw, list):
            return [pick(r, v) for r, v in zip(raw, resolved, strict=True)]
        return raw if isinstance(raw, str) and "oc.env" in raw else resolved

    return pick(OmegaConf.to_container(node, resolve=False), OmegaConf.to_container(node, resolve=True))


def check(node: DictConfig, prefix: str, schema: Schema, closed: bool = True, extra: Iterable[str] = ()) -> None:
    """Check `node` against `schema`: with `closed`, keys outside the schema (and `extra`) are refused; required keys
    must be present; present values must pass their rule."""
    if closed:
        unknown(node, prefix, {*schema, *extra})
    for key, rule in schema.items():
        value = value_of(node, key)
        if value is MISSING:
            if rule.required and closed:
                raise ConfigError(_join(prefix, key), MISSING, rule.allowed)
        elif not rule.ok(value):
            raise ConfigError(_join(prefix, key), shown(node, key), rule.allowed)


def unknown(node: DictConfig, prefix: str, known: Iterable[str], what: str | None = None) -> None:
    """Refuse a key of `node` outside `known`, naming the nearest known one."""
    known = sorted(known)
    for key in node:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            keys = ", ".join(k for k in known if k not in HYDRA_KEYS)
            raise ConfigError(
                _join(prefix, str(key)),
                shown(node, key),
                f"{what or prefix or 'the config'} has no such key; {hint}its keys are {keys}",
            )


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def target_signature(node: DictConfig, prefix: str) -> inspect.Signature:
    """The signature of what `node["_target_"]` names (a class's __init__, or a function)."""
    from hydra.utils import get_object

    target = value_of(node, "_target_")
    if not is_str(target):
        raise ConfigError(_join(prefix, "_target_"), target, "expected the dotted name of a class or function")
    try:
        return inspect.signature(get_object(target))
    except (ImportError, AttributeError, ValueError, TypeError) as error:
        raise ConfigError(
            _join(prefix, "_target_"), target, f"expected an importable class or function ({error})"
        ) from None


def check_target(node: DictConfig, prefix: str, group: str, ranges: Schema) -> None:
    """A `_target_` config: its keys are arguments of its target (all of them, when it takes **kwargs), the arguments
    without a default that descent does not pass are present, the ones descent passes are absent, and each value
    passes its range rule."""
    signature = target_signature(node, prefix)
    parameters = {name: p for name, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL,)}
    supplied = SUPPLIED.get(group, ())
    takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    for key in supplied:
        if key in node:
            instead = INSTEAD.get(f"{group}.{key}", "")
            raise ConfigError(
                _join(prefix, key), shown(node, key), f"set by descent itself; remove {prefix}.{key}{instead}"
            )
    accepted = {name for name, p in parameters.items() if p.kind != p.VAR_KEYWORD} - set(supplied)
    if not takes_any:
        unknown(node, prefix, accepted | HYDRA_KEYS, what=str(node["_target_"]))
    for name in sorted(accepted):
        parameter = parameters[name]
        required = parameter.default is parameter.empty or name in REQUIRED.get(group, ())
        if required and parameter.kind != parameter.VAR_KEYWORD and name not in node:
            allowed = ranges[name].allowed if name in ranges else f"an argument of {node['_target_']} without default"
            raise ConfigError(_join(prefix, name), MISSING, allowed)
    check(node, prefix, ranges, closed=False)


def validate(cfg: DictConfig) -> None:
    """Raise `ConfigError` on the first value a training run must not start with."""
    from descent.data.sources import SCHEMAS

    check(cfg, "", TOP, extra=TRAIN_GROUPS)
    for group in TRAIN_GROUPS:
        if group not in cfg:
            raise ConfigError(group, MISSING, f"expected the {group} group (conf/{group}/)")
    check(cfg.cv, "cv", CV)
    check(cfg.target, "target", TARGET)
    check(cfg.compare, "compare", COMPARE)
    if cfg.replicates > 1 and cfg.cv.folds:
        raise ConfigError(
            "replicates", cfg.replicates, "expected 1 with cv.folds >= 2: a CV run's replicates are its folds"
        )
    if cfg.cv.fold is not None and cfg.cv.fold >= cfg.cv.folds:
        allowed = "expected null (every fold) or a fold number in [0, cv.folds), with cv.folds >= 2"
        raise ConfigError("cv.fold", cfg.cv.fold, allowed)
    if cfg.ckpt_path is not None and cfg.cv.folds and cfg.cv.fold is None:
        raise ConfigError(
            "ckpt_path",
            cfg.ckpt_path,
            "a checkpoint resumes one fold: add cv.fold=i (and hydra.run.dir=<the CV run's folder>)",
        )
    check_paths(cfg.paths)

    name = value_of(cfg.data, "name")
    if name not in SCHEMAS:
        raise ConfigError("data.name", name, f"expected one of {', '.join(sorted(SCHEMAS))}")
    source = SCHEMAS[name]
    check(cfg.data, "data", {**DATA, **source})
    if cfg.data.get("official_test") and cfg.cv.folds:
        allowed = (
            "expected false with cv.folds >= 2: the folds are the test sets (or cv.folds=0 to keep the official one)"
        )
        raise ConfigError("data.official_test", True, allowed)
    if "stream" in source:
        check(cfg.data.stream, "data.stream", STREAM)

    check_target(cfg.model, "model", "model", MODEL)
    if "activation" in cfg.model:
        from descent.model import ACTIVATIONS

        if cfg.model.activation not in ACTIVATIONS:
            raise ConfigError("model.activation", cfg.model.activation, f"expected one of {', '.join(ACTIVATIONS)}")
    check_target(cfg.optimizer, "optimizer", "optimizer", OPTIMIZER)
    if cfg.get("lr_find"):
        check_lr_find(cfg)
    check_trainer(cfg.trainer)
    check_callbacks(cfg.callbacks)
    check_validation_is_on(cfg.trainer, cfg.callbacks)
    check_clipping(cfg.trainer, cfg.optimizer)
    check_loggers(cfg.logger)
    # after trainer: cosine's T_max follows trainer.max_epochs, whose own message names the key the user set
    if cfg.scheduler is not None:
        check(cfg.scheduler, "scheduler", SCHEDULER)
        check_target(cfg.scheduler.scheduler, "scheduler.scheduler", "scheduler", TORCH_SCHEDULER)
    if cfg.replicates > 1 and cfg.replicates_vectorized:
        check_vectorized(cfg)


# replicates_vectorized=true: what the k replicates trained at once as one batched model support exactly
SEQUENTIALLY = "use replicates_vectorized=false (one replicate after another)"
VECTORIZED_TRAINER = frozenset(
    {
        *("_target_", "accelerator", "devices", "max_epochs", "max_steps", "min_epochs", "num_sanity_val_steps"),
        *("enable_model_summary", "log_every_n_steps", "profiler", "gradient_clip_val", "gradient_clip_algorithm"),
        *("accumulate_grad_batches", "precision", "deterministic", "benchmark", "check_val_every_n_epoch"),
        "val_check_interval",
    }
)
COUPLED_PRECISIONS = ("16", "16-mixed", "transformer-engine", "transformer-engine-float16")
REPLICATE_METRICS = ("train/loss", "train/acc", "train/f1", "val/loss", "val/acc", "val/f1")
VECTORIZED_BEST = frozenset(
    {
        *("_target_", "filename", "monitor", "mode", "save_weights_only", "save_last", "save_top_k", "verbose"),
        *("auto_insert_metric_name", "enable_version_counter", "every_n_epochs", "save_on_train_epoch_end"),
    }
)
VECTORIZED_EARLY_STOPPING = frozenset(
    {
        *("_target_", "monitor", "mode", "patience", "min_delta", "check_finite", "stopping_threshold"),
        *("divergence_threshold", "verbose", "strict", "log_rank_zero_only", "check_on_train_epoch_end"),
    }
)
BEST_DEFAULTS: Mapping[str, tuple[Any, ...]] = {
    "save_weights_only": (True,),
    "save_last": (None, False),
    "save_top_k": (1,),
    "every_n_epochs": (None, 1),
}


def check_vectorized(cfg: DictConfig) -> None:
    """Refuse what the k replicates trained at once cannot compute as k separate runs would, or what makes no sense
    for one batched model: an optimizer that is not element-wise, a scheduler reading a metric, a precision whose
    loss scaler skips every replicate's step when one overflows, Trainer flags and callbacks beyond those supported."""
    import torch
    from hydra.utils import get_class, instantiate
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, ProgressBar

    from descent.batched import is_elementwise

    optimizer = instantiate(OmegaConf.to_container(cfg.optimizer))([torch.nn.Parameter(torch.zeros(1))])
    if not is_elementwise(type(optimizer)):
        allowed = (
            f"{type(optimizer).__name__} is not element-wise, so one optimizer over the stacked replicates would "
            f"mix them (SGD, Adam, AdamW, RMSprop and the course's forms are); {SEQUENTIALLY}"
        )
        raise ConfigError("optimizer._target_", cfg.optimizer["_target_"], allowed)
    if cfg.scheduler is not None:
        target = cfg.scheduler.scheduler["_target_"]
        if issubclass(get_class(target), torch.optim.lr_scheduler.ReduceLROnPlateau):
            allowed = f"it steps the lr the replicates share from one metric, which couples them; {SEQUENTIALLY}"
            raise ConfigError("scheduler.scheduler._target_", target, allowed)
    for key in cfg.trainer:
        value = cfg.trainer[key]
        if key not in VECTORIZED_TRAINER and value not in (None, "auto", False):
            supported = ", ".join(sorted(VECTORIZED_TRAINER - HYDRA_KEYS))
            allowed = f"not supported with the replicates trained at once ({supported}); {SEQUENTIALLY}"
            raise ConfigError(f"trainer.{key}", shown(cfg.trainer, key), allowed)
    if cfg.trainer.get("min_epochs"):
        allowed = f"expected null: each replicate stops on its own when it diverges or stops early; {SEQUENTIALLY}"
        raise ConfigError("trainer.min_epochs", cfg.trainer.min_epochs, allowed)
    if str(cfg.trainer.get("precision")) in COUPLED_PRECISIONS:
        allowed = (
            "its loss scaler skips the step of every replicate when one replicate's gradients overflow: use "
            f"bf16-mixed or 32-true, or {SEQUENTIALLY}"
        )
        raise ConfigError("trainer.precision", cfg.trainer.precision, allowed)
    best = 0
    for name, callback in (cfg.callbacks or {}).items():
        if callback is None:
            continue
        cls, prefix = get_class(callback["_target_"]), f"callbacks.{name}"
        if issubclass(cls, ModelCheckpoint) and callback.get("monitor") is not None:
            best += 1
            _check_per_replicate(callback, prefix, VECTORIZED_BEST, best)
            for key, values in BEST_DEFAULTS.items():
                if callback.get(key, values[0]) not in values:
                    allowed = f"expected {values[0]}: each replicate's best.ckpt holds its best weights; {SEQUENTIALLY}"
                    raise ConfigError(f"{prefix}.{key}", callback[key], allowed)
            if callback.get("save_on_train_epoch_end"):
                allowed = f"expected false: each replicate's best is chosen after its validation; {SEQUENTIALLY}"
                raise ConfigError(f"{prefix}.save_on_train_epoch_end", True, allowed)
        elif issubclass(cls, EarlyStopping):
            _check_per_replicate(callback, prefix, VECTORIZED_EARLY_STOPPING, 1)
            if callback.get("check_on_train_epoch_end"):
                allowed = f"expected false: each replicate is checked after its validation; {SEQUENTIALLY}"
                raise ConfigError(f"{prefix}.check_on_train_epoch_end", True, allowed)
        elif not issubclass(cls, ModelCheckpoint | ProgressBar | LearningRateMonitor):
            allowed = (
                "a callback of the replicates trained at once is per replicate (model_checkpoint, early_stopping) or "
                f"sees the batched model (last_checkpoint, progress_bar, lr_monitor); {SEQUENTIALLY}"
            )
            raise ConfigError(f"{prefix}._target_", callback["_target_"], allowed)


def _check_per_replicate(callback: DictConfig, prefix: str, keys: frozenset[str], count: int) -> None:
    """A callback applied to each replicate on its own: its keys among `keys`, one of its kind, a metric it has."""
    for key in callback:
        if key not in keys:
            allowed = f"not supported per replicate (its keys: {', '.join(sorted(keys - HYDRA_KEYS))}); {SEQUENTIALLY}"
            raise ConfigError(f"{prefix}.{key}", shown(callback, key), allowed)
    if count > 1:
        raise ConfigError(
            prefix, callback["_target_"], f"expected one monitored checkpoint per replicate; {SEQUENTIALLY}"
        )
    if callback.monitor not in REPLICATE_METRICS:
        allowed = f"expected one of {', '.join(REPLICATE_METRICS)} (each replicate's own metrics)"
        raise ConfigError(f"{prefix}.monitor", callback.monitor, allowed)


def check_lr_find(cfg: DictConfig) -> None:
    """lr_find=true searches one lr for one model on one split, before a fresh fit."""
    if cfg.cv.folds:
        allowed = "expected false with cv.folds (each fold would search its own lr): search on one split, then give "
        raise ConfigError("lr_find", True, allowed + "optimizer.lr=<its suggestion> to the cross-validation")
    if cfg.get("replicates", 1) > 1:
        allowed = "expected false with replicates (they must share one lr): search once, then give optimizer.lr"
        raise ConfigError("lr_find", True, allowed)
    if cfg.trainer.get("fast_dev_run"):
        raise ConfigError("lr_find", True, "expected false with trainer.fast_dev_run, under which Lightning skips it")


def validate_eval(cfg: DictConfig) -> None:
    """Raise `ConfigError` on the first value an evaluation must not start with."""
    unknown(cfg, "", {"task_name", "ckpt_path", "threads", *EVAL_GROUPS})
    check_given(cfg, {"ckpt_path": Rule(is_str, CHECKPOINT)})
    check(cfg, "", {key: TOP[key] for key in ("task_name", "threads")}, closed=False)
    check_trainer(cfg.trainer)
    check_loggers(cfg.logger)
    check_paths(cfg.paths)


def validate_predict(cfg: DictConfig) -> None:
    """Raise `ConfigError` on the first value a prediction must not start with."""
    unknown(cfg, "", {"task_name", "ckpt_path", "threads", *PREDICT, *PREDICT_GROUPS})
    check_given(cfg, {"ckpt_path": Rule(is_str, CHECKPOINT), "images": PREDICT["images"]})
    check(cfg, "", {**{key: TOP[key] for key in ("task_name", "threads")}, **PREDICT}, closed=False)
    check_trainer(cfg.trainer)
    check_paths(cfg.paths)


def check_given(cfg: DictConfig, schema: Schema) -> None:
    """Keys the command line must give (`???` in the config): absent, they are refused as missing, not a traceback."""
    for key, rule in schema.items():
        if key not in cfg or OmegaConf.is_missing(cfg, key):
            raise ConfigError(key, MISSING, f"{rule.allowed}: add {key}=...")
        if not rule.ok(cfg[key]):
            raise ConfigError(key, shown(cfg, key), rule.allowed)


def check_paths(node: DictConfig) -> None:
    """The `paths` group's keys, none missing and none unknown; their values (interpolations of Hydra's run folder
    among them) are not resolved here."""
    unknown(node, "paths", PATHS)
    for key in PATHS:
        if key not in node:
            raise ConfigError(f"paths.{key}", MISSING, "expected a folder")


def check_trainer(node: DictConfig) -> None:
    check_target(node, "trainer", "trainer", TRAINER)
    if node.get("max_epochs") == -1 and node.get("max_steps", -1) == -1 and node.get("max_time") is None:
        allowed = "expected a positive int: -1 (no limit) needs trainer.max_steps or trainer.max_time to end the run"
        raise ConfigError("trainer.max_epochs", -1, allowed)


def check_clipping(trainer: DictConfig, optimizer: DictConfig) -> None:
    """Refuse gradient clipping under mixed precision with a fused optimizer (Adam's configs set `fused: true`):
    such an optimizer unscales the gradients inside its step, so Lightning cannot clip them first."""
    mixed = "mixed" in str(trainer.get("precision")) or str(trainer.get("precision")) in ("16", "bf16")
    if mixed and (trainer.get("gradient_clip_val") or 0) > 0 and optimizer.get("fused"):
        allowed = (
            f"expected null with a fused optimizer under trainer.precision={trainer.precision}: it unscales the "
            "gradients in its own step, so Lightning cannot clip them; add optimizer.fused=false"
        )
        raise ConfigError("trainer.gradient_clip_val", trainer.gradient_clip_val, allowed)


def check_validation_is_on(trainer: DictConfig, callbacks: DictConfig | None) -> None:
    """`trainer.limit_val_batches=0` turns validation off: refused while a callback monitors a val metric (the best
    checkpoint and early stopping are chosen on val)."""
    if trainer.get("limit_val_batches") != 0 or trainer.get("fast_dev_run"):
        return
    for name, callback in (callbacks or {}).items():
        if callback is not None and str(callback.get("monitor") or "").startswith("val/"):
            allowed = (
                f"expected > 0: callbacks.{name} monitors {callback.monitor}; to train without validation also set "
                f"callbacks.{name}=null (without model_checkpoint the last epoch is tested)"
            )
            raise ConfigError("trainer.limit_val_batches", trainer.limit_val_batches, allowed)


def check_callbacks(node: DictConfig | None) -> None:
    for name, callback in (node or {}).items():
        if callback is not None:
            check_target(callback, f"callbacks.{name}", "callbacks", CALLBACK)


def check_loggers(node: DictConfig | None) -> None:
    for name, logger in (node or {}).items():
        if logger:
            check_target(logger, f"logger.{name}", "logger", {})


def check_batch_size(batch_size: int | str, n_train: int, batch_norm: bool) -> int:
    """The number of samples per training batch, refusing sizes the data or batch norm cannot take."""
    size = n_train if batch_size == "full" else int(batch_size)
    if size > n_train:
        raise ConfigError(
            "data.batch_size", batch_size, f"expected at most the training split's {n_train} samples, or 'full'"
        )
    if batch_norm and size == 1:
        raise ConfigError(
            "data.batch_size",
            batch_size,
            "batch norm needs at least 2 samples a batch: use data.batch_size>=2, or model.batch_norm=false "
            "for stochastic gradient descent",
        )
    return size


def exit_on_config_error(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Turn a `ConfigError` into one logged line and exit code 2 (a traceback only with HYDRA_FULL_ERROR=1)."""

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

"""Interruption and resume: a signal's stop turned into an `interrupted` run and its exit code, and the config a
resumed run continues with (its own, from its checkpoint).

It never changes what a run computes: a resumed run ends where an uninterrupted one ends.
"""

from __future__ import annotations

import functools
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from descent.callbacks import STATE_KEY, GracefulStop
from descent.config import MISSING, ConfigError
from descent.files import write_atomically
from descent.results import Status, read_results, status_of


class Interrupted(BaseException):
    """The run was stopped by a signal after writing last.ckpt; the process exits with 128 + the signal's number.

    A BaseException, like KeyboardInterrupt: a handler of `Exception` (a sweep recording failed jobs) must not
    swallow a stop request."""

    def __init__(self, signum: int, last_checkpoint: Path) -> None:
        self.signum, self.last_checkpoint = signum, last_checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; last.ckpt written: {last_checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def stop_on_signal(fit: Callable[[], Any], stopper: GracefulStop) -> Any:
    """Call `fit`; if a signal stopped it, raise `Interrupted` (last.ckpt is on disk by then)."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    try:
        return fit()
    except SIGTERMException:
        if stopper.signum is None:
            raise
        raise Interrupted(stopper.signum, stopper.last_checkpoint) from None


def exit_on_interrupt(main: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Turn `Interrupted` into exit code 128 + the signal's number (143 for SIGTERM, 130 for SIGINT)."""

    @functools.wraps(main)
    def wrapper(cfg: Any) -> Any:
        try:
            return main(cfg)
        except Interrupted as stop:
            sys.exit(stop.exit_code)

    return wrapper


# keys a resume may change: when training stops, how the best epoch and early stopping are kept, what shows the run
MAY_CHANGE = (
    "trainer.max_epochs",
    "trainer.min_epochs",
    "trainer.max_steps",
    "trainer.min_steps",
    "trainer.max_time",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.profiler",
    "callbacks.early_stopping",
    "callbacks.model_checkpoint",
    "callbacks.last_checkpoint",
    "callbacks.progress_bar",
    "callbacks.lr_monitor",
    "logger",
    "tags",
)


def resumed_config(cfg: DictConfig, overrides: list[str], run_dir: Path) -> tuple[DictConfig, list[str]]:
    """The config and overrides a run continues with. A resume is either explicit, `python train.py [OVERRIDES]
    ckpt_path=DIR/checkpoints/last.ckpt hydra.run.dir=DIR` (DIR, or a new folder), or the same command started again
    in a folder whose run was interrupted (how a requeued SLURM job continues). With no OVERRIDES it continues with
    the config saved in the checkpoint by the run that wrote it; with OVERRIDES, with theirs, which may differ from
    the saved one in MAY_CHANGE only (`trainer.max_epochs` larger trains it longer). Hydra has just rewritten the
    folder's `.hydra/config.yaml` and `overrides.yaml` for this command; they get the run's own (eval.py reads them)."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        last = run_dir / "checkpoints" / "last.ckpt"
        if not (last.is_file() and status_of(read_results(run_dir)) == Status.INTERRUPTED):
            return cfg, overrides
        ckpt_path, saved = str(last), saved_run(str(last))
        if overrides != saved["overrides"]:
            allowed = (
                f"holds an interrupted run of other overrides {saved['overrides']}: resume it with "
                f"ckpt_path={last}, or train in another folder"
            )
            raise ConfigError("hydra.run.dir", str(run_dir), allowed)
        config, overrides = saved["config"], list(saved["overrides"])
    else:
        saved = saved_run(ckpt_path)
        own = [item for item in overrides if item.split("=", 1)[0].lstrip("+~") != "ckpt_path"]
        if own:
            config = OmegaConf.to_container(cfg, resolve=False) | {"ckpt_path": None}
            if config.get("lr_find") and saved["config"].get("lr_find"):  # the search set the run's lr
                config["optimizer"]["lr"] = saved["config"]["optimizer"]["lr"]
            check_continues(saved, config, ckpt_path)
            overrides = own
        else:
            config, overrides = saved["config"], list(saved["overrides"])
    hydra_dir = run_dir / ".hydra"
    if hydra_dir.is_dir():
        OmegaConf.save(OmegaConf.create(config), hydra_dir / "config.yaml")
        OmegaConf.save(OmegaConf.create(list(overrides)), hydra_dir / "overrides.yaml")
    resumed = OmegaConf.create(config)
    resumed.ckpt_path = ckpt_path
    OmegaConf.set_struct(resumed, True)
    return resumed, overrides


def check_continues(saved: dict[str, Any], config: dict[str, Any], ckpt_path: str) -> None:
    """Refuse a config that is not the checkpoint's run continued: a key outside MAY_CHANGE that differs from the
    saved config (compared resolved, so that cosine's T_max following trainer.max_epochs counts), or a
    max_epochs/max_steps the checkpoint has already passed."""
    ours, theirs = _flat(_resolved(config)), _flat(_resolved(saved["config"]))
    differing = [
        key
        for key in sorted(ours.keys() | theirs.keys())
        if ours.get(key, MISSING) != theirs.get(key, MISSING) and not _may_change(key)
    ]
    if differing:
        allowed = (
            f"a resume continues the run of its checkpoint, whose overrides were {saved['overrides']}; these keys "
            f"differ from it: {', '.join(differing)} (give the run's own overrides, or none; only "
            "trainer.max_epochs/max_steps/max_time and the callbacks' settings may change)"
        )
        raise ConfigError("ckpt_path", ckpt_path, allowed)
    trainer = config.get("trainer") or {}
    for key, done in (("max_epochs", saved["epoch"] + 1), ("max_steps", saved["global_step"])):
        value = trainer.get(key)
        if isinstance(value, int) and value != -1 and value < done:
            allowed = f"expected -1 or at least {done}: the checkpoint's run has trained that far already"
            raise ConfigError(f"trainer.{key}", value, allowed)


def extended_from(cfg: DictConfig) -> dict[str, int]:
    """`{"extended_from": N}` when a resume trains longer than the run it continues, whose max_epochs was N."""
    if cfg.get("ckpt_path") is None:
        return {}
    earlier = (saved_run(cfg.ckpt_path)["config"].get("trainer") or {}).get("max_epochs")
    later = cfg.trainer.get("max_epochs")
    if isinstance(earlier, int) and isinstance(later, int) and earlier != -1 and (later > earlier or later == -1):
        return {"extended_from": earlier}
    return {}


def carry_over(ckpt_path: str | Path, run_dir: Path) -> None:
    """Before a resume trains: steps.csv keeps the rows up to the checkpoint's step (a run killed after writing
    steps past its last checkpoint must not repeat them); in a new folder, it gets those rows and the earlier run's
    checkpoints (its best.ckpt, which the resumed ModelCheckpoint keeps or improves on); the old folder is only read.
    """
    source = Path(ckpt_path).resolve().parent.parent
    step = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    steps_up_to(source / "steps.csv", run_dir / "steps.csv", step)
    if source == run_dir.resolve():
        return
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name in ("best.ckpt", "last.ckpt"):
        if (source / "checkpoints" / name).is_file():
            shutil.copyfile(source / "checkpoints" / name, run_dir / "checkpoints" / name)


def steps_up_to(source: Path, target: Path, step: int) -> None:
    """Write to `target` the header and rows of steps.csv `source` whose step is at most `step` (in place when the
    same file); nothing when `source` does not exist."""
    if not source.is_file():
        return
    cut = False
    with open(source, "rb") as file:
        kept = [file.readline()]
        for line in file:
            fields = line.split(b",")
            if len(fields) != 3 or not fields[1].isdigit() or int(fields[1]) > step or not line.endswith(b"\n"):
                cut = True  # rows are in step order; a line without its end is the tail of a kill
                break
            kept.append(line)
    if cut or source.resolve() != target.resolve():
        write_atomically(target, b"".join(kept))


def _resolved(config: dict[str, Any]) -> Any:
    """`config` resolved where it resolves; as written where it does not (an unset `${oc.env:...}`)."""
    node = OmegaConf.create(config)
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:
        return OmegaConf.to_container(node, resolve=False)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested dict, each with its value (lists are values)."""
    if not isinstance(node, dict) or (not node and prefix):
        return {prefix: node}
    flat = {}
    for name, child in node.items():
        flat |= _flat(child, f"{prefix}.{name}" if prefix else str(name))
    return flat


def _may_change(key: str) -> bool:
    return any(key == allowed or key.startswith(f"{allowed}.") for allowed in MAY_CHANGE)


def saved_run(ckpt_path: Any) -> dict[str, Any]:
    """RunState's entry of a checkpoint (its config and overrides), with the checkpoint's epoch and global step."""
    if not isinstance(ckpt_path, str) or not Path(ckpt_path).is_file():
        raise ConfigError(
            "ckpt_path", ckpt_path, "expected an existing checkpoint file, e.g. DIR/checkpoints/last.ckpt"
        )
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    saved = checkpoint.get("callbacks", {}).get(STATE_KEY)
    if saved is None:
        allowed = (
            "expected a full checkpoint written by this project's train.py, such as DIR/checkpoints/last.ckpt "
            "(best.ckpt holds the best epoch's weights only)"
        )
        raise ConfigError("ckpt_path", ckpt_path, allowed)
    return {**saved, "epoch": int(checkpoint["epoch"]), "global_step": int(checkpoint["global_step"])}

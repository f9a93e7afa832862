"""Interruption and resume: a signal's stop turned into an `interrupted` run and its exit code, and the config a
resumed run continues with (its own, from its checkpoint).

It never changes what a run computes: a resumed run ends where an uninterrupted one ends.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from descent.callbacks import STATE_KEY, GracefulStop
from descent.config import ConfigError
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


def resumed_config(cfg: DictConfig, overrides: list[str], run_dir: Path) -> tuple[DictConfig, list[str]]:
    """The config and overrides a run continues with: those given, or, on a resume, those saved in the checkpoint by
    the run that wrote it. A resume is either explicit, `python train.py ckpt_path=DIR/checkpoints/last.ckpt
    hydra.run.dir=DIR` (no other override: it would no longer be the same run), or the same command started again in
    a folder whose run was interrupted (how a requeued SLURM job continues). Hydra has just rewritten the folder's
    `.hydra/config.yaml` and `overrides.yaml` for this command; they get the run's own back (eval.py reads them)."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        last = run_dir / "checkpoints" / "last.ckpt"
        if not (last.is_file() and status_of(read_results(run_dir)) == Status.INTERRUPTED):
            return cfg, overrides
        ckpt_path, saved = str(last), _saved_run(str(last))
        if overrides != saved["overrides"]:
            allowed = (
                f"holds an interrupted run of other overrides {saved['overrides']}: resume it with "
                f"ckpt_path={last}, or train in another folder"
            )
            raise ConfigError("hydra.run.dir", str(run_dir), allowed)
    else:
        extra = [item for item in overrides if item.split("=", 1)[0].lstrip("+~") != "ckpt_path"]
        if extra:
            raise ConfigError(
                "ckpt_path", ckpt_path, f"a resume continues the run's own config; give no other override (got {extra})"
            )
        saved = _saved_run(ckpt_path)
    hydra_dir = run_dir / ".hydra"
    if hydra_dir.is_dir():
        OmegaConf.save(OmegaConf.create(saved["config"]), hydra_dir / "config.yaml")
        OmegaConf.save(OmegaConf.create(list(saved["overrides"])), hydra_dir / "overrides.yaml")
    resumed = OmegaConf.create(saved["config"])
    resumed.ckpt_path = ckpt_path
    OmegaConf.set_struct(resumed, True)
    return resumed, list(saved["overrides"])


def _saved_run(ckpt_path: Any) -> dict[str, Any]:
    """RunState's entry of a checkpoint: its config and overrides."""
    if not isinstance(ckpt_path, str) or not Path(ckpt_path).is_file():
        raise ConfigError(
            "ckpt_path", ckpt_path, "expected an existing checkpoint file, e.g. DIR/checkpoints/last.ckpt"
        )
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("callbacks", {}).get(STATE_KEY)
    if saved is None:
        allowed = (
            "expected a full checkpoint written by this project's train.py, such as DIR/checkpoints/last.ckpt "
            "(best.ckpt holds the best epoch's weights only)"
        )
        raise ConfigError("ckpt_path", ckpt_path, allowed)
    return saved

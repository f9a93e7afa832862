"""Every Lightning callback of a run but Lightning's own (checkpoints, early stopping, the bar: conf/callbacks):
the epoch history (metrics.csv), the step losses (steps.csv), the run state an exact resume needs, the signal stop,
and W&B's finish on error.

They only observe the run and write files or checkpoint state; none of them changes what a run computes.
"""

from __future__ import annotations

import csv
import math
import signal
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.trainer.states import TrainerFn

from descent.checkpoints import rng_states, set_rng_states

COLUMNS = ("epoch", "step", "time_s", "train/loss", "train/acc", "train/f1", "val/loss", "val/acc", "val/f1", "lr")
INTEGER_COLUMNS = ("epoch", "step")  # written as ints in metrics.csv
STATE_KEY = "descent"  # where RunState's entry sits under checkpoint["callbacks"]


class EpochHistory(pl.Callback):
    """Records each epoch's metrics and writes `metrics.csv` as it goes, whatever the logger.

    Written by hand because Lightning's CSVLogger writes one row per log call (so train, val and lr land on separate
    rows), and deletes an existing metrics.csv when a run resumes into its folder. The rows travel in checkpoints.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, float]] = []
        self.elapsed_before = 0.0  # training seconds of the run before a resume
        self.started = 0.0
        self.lr = math.nan
        self.written = 0  # rows already in metrics.csv: later epochs append theirs

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]  # the lr this epoch trains with (schedulers step later)

    def elapsed(self) -> float:
        """Seconds of training so far, the part before a resume included."""
        return self.elapsed_before + (time.perf_counter() - self.started if self.started else 0.0)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        logged = trainer.callback_metrics
        row = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "time_s": round(self.elapsed(), 4),
            **{key: float(logged[key]) for key in COLUMNS if key in logged},
            "lr": self.lr,
        }
        self.rows.append(row)
        if trainer.is_global_zero:  # DDP: the other ranks hold the same synced rows
            self.write()

    def write(self) -> None:
        """Append the new rows; the first write of a fit (and of a resume, whose rows come from its checkpoint)
        rewrites the file whole."""
        with open(self.path, "a" if self.written else "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS, extrasaction="ignore")
            if not self.written:
                writer.writeheader()
            writer.writerows(self.rows[self.written :])
        self.written = len(self.rows)

    def state_dict(self) -> dict[str, Any]:
        """The rows as one float64 tensor over COLUMNS and a mask of the values each row has (as dicts, torch.save
        would pickle every value as an object of its own)."""
        values = [[row.get(key, math.nan) for key in COLUMNS] for row in self.rows]
        present = [[key in row for key in COLUMNS] for row in self.rows]
        return {
            "columns": list(COLUMNS),
            "values": torch.tensor(values, dtype=torch.float64).reshape(len(values), len(COLUMNS)),
            "present": torch.tensor(present, dtype=torch.bool).reshape(len(values), len(COLUMNS)),
            "elapsed": self.elapsed(),
            "lr": self.lr,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = _unpacked(state_dict) if "values" in state_dict else list(state_dict["rows"])  # or as dicts
        self.written = 0
        self.elapsed_before = float(state_dict["elapsed"])
        self.lr = state_dict.get("lr", self.lr)  # a mid-epoch resume skips on_train_epoch_start

    def to_target(self, val_acc: float) -> dict[str, Any]:
        """The run's convergence speed: the epoch, optimizer step and training seconds of the first validation whose
        val/acc reached `val_acc` (nulls when none did)."""
        reached = next((row for row in self.rows if row.get("val/acc", -math.inf) >= val_acc), {})
        return {
            "val_acc": val_acc,
            "epoch": reached.get("epoch"),
            "step": reached.get("step"),
            "seconds": reached.get("time_s"),
        }

    def best(self) -> dict[str, float] | None:
        """The row with the highest val/acc, the first one on ties, as ModelCheckpoint(mode=max) keeps it."""
        scored = [row for row in self.rows if math.isfinite(row.get("val/acc", math.nan))]
        return max(scored, key=lambda row: row["val/acc"]) if scored else None


def _unpacked(state: dict[str, Any]) -> list[dict[str, float]]:
    """EpochHistory's rows back from their packed form: the values each row had, epoch and step as ints."""
    rows = []
    for values, present in zip(state["values"].tolist(), state["present"].tolist(), strict=True):
        row = {key: value for key, value, has in zip(state["columns"], values, present, strict=True) if has}
        rows.append({key: int(value) if key in INTEGER_COLUMNS else value for key, value in row.items()})
    return rows


class StepLosses(pl.Callback):
    """Writes the training loss of every optimizer step to `steps.csv` (`epoch`, `step`, `loss`), once per epoch.

    The losses stay on the device during the epoch and are read back in one transfer at its end: no per-step
    synchronisation and no per-step `self.log`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.losses: list[torch.Tensor] = []
        self.steps: list[int] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and (trainer.ckpt_path is None or not self.path.is_file()):  # a resume appends
            self.path.write_text("epoch,step,loss\n")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else None
        if loss is not None:
            self.losses.append(loss)
            self.steps.append(trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.write(trainer)  # an interrupted epoch keeps its steps so far; a resume appends the rest

    def write(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero:  # DDP: steps.csv holds the losses of rank 0's batches
            losses = torch.stack(self.losses).tolist() if self.losses else []
            with open(self.path, "a") as file:
                file.writelines(
                    f"{trainer.current_epoch},{step},{loss!r}\n" for step, loss in zip(self.steps, losses, strict=True)
                )
        self.losses, self.steps = [], []


class RunState(pl.Callback):
    """Puts in every checkpoint what Lightning leaves out and an exact resume needs: the RNG states at the moment
    of saving, the run's config as composed (unresolved, so `${oc.env:...}` stays a reference, never a value) and its
    command-line overrides. Restoring puts the RNG states back before the first resumed batch."""

    def __init__(self, config: dict[str, Any], overrides: list[str]) -> None:
        self.config, self.overrides = config, overrides  # a resume takes back those of the run it continues

    @property
    def state_key(self) -> str:
        return STATE_KEY

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states(), "config": self.config, "overrides": self.overrides}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_states(state_dict["rng"])
        self.config, self.overrides = state_dict["config"], list(state_dict["overrides"])


class GracefulStop(pl.Callback):
    """SIGTERM or SIGINT during fit: finish the current batch, write last.ckpt, and stop.

    Lightning already turns SIGTERM into a `SIGTERMException` at the next batch boundary (never mid-update); SIGINT
    is routed the same way instead of Lightning's KeyboardInterrupt path, which can land mid-step and exits with 1.
    """

    def __init__(self, last_checkpoint: Path) -> None:
        self.last_checkpoint = last_checkpoint
        self.signum: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lightning_sigterm = signal.getsignal(signal.SIGTERM)  # installed by Lightning's SignalConnector for this fit

        def stop(signum: int, frame: Any) -> None:
            self.signum = self.signum or signum
            if callable(lightning_sigterm):
                lightning_sigterm(signum, frame)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)  # Lightning's teardown puts back the handlers it found before fit

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.signum is not None:
            trainer.save_checkpoint(self.last_checkpoint, weights_only=False)


class FinishWandbOnError(pl.Callback):
    """When fit or test raises, finish the W&B run so that it does not stay open (and swallow the next run of a
    sweep): exit code 128 + the signal's number when `stopper` (a GracefulStop) saw one, else 1."""

    def __init__(self, stopper: GracefulStop | None = None) -> None:
        self.stopper = stopper

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from descent.loggers import finish_wandb

        signum = self.stopper.signum if self.stopper is not None else None
        if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
            finish_wandb(exit_code=128 + signum if signum else 1)

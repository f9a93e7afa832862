"""Every Lightning callback of a run but Lightning's own (best.ckpt, early stopping, the bar: conf/callbacks):
the epoch history (metrics.csv), the step losses (steps.csv), last.ckpt on its cadence, the run state an exact
resume needs, the signal stop, and W&B's finish on error.

They only observe the run and write files or checkpoint state; none of them changes what a run computes.
"""

from __future__ import annotations

import csv
import math
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.trainer.states import TrainerFn

from descent.checkpoints import rng_states, set_rng_states

COLUMNS = ("epoch", "step", "time_s", "train/loss", "train/acc", "train/f1", "val/loss", "val/acc", "val/f1", "lr")
INTEGER_COLUMNS = ("epoch", "step")  # written as ints in metrics.csv
STATE_KEY = "descent"  # where RunState's entry sits under checkpoint["callbacks"]


def steps_taken(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
    """The optimizer steps a run has taken: Lightning's count, less those a diverged Classifier skipped after its
    non-finite loss (its `diverged_at`) until it read it."""
    diverged = getattr(pl_module, "diverged_at", None)
    return trainer.global_step if not isinstance(diverged, int) else min(trainer.global_step, diverged + 1)


class EpochHistory(pl.Callback):
    """Records the metrics of each validation, and of each epoch that ends without one, and writes `metrics.csv` as
    it goes, whatever the logger. A row's train metrics are those of the batches since the previous row (the epoch,
    when validating once an epoch); a row without validation has no val metrics. Also counts the training samples.

    Written by hand because Lightning's CSVLogger writes one row per log call (so train, val and lr land on separate
    rows), and deletes an existing metrics.csv when a run resumes into its folder. The rows travel in checkpoints.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, float]] = []
        self.elapsed_before = 0.0  # training seconds of the run before a resume
        self.started = 0.0
        self.lr = math.nan
        self.samples = 0  # training samples of every device so far, those before a resume included
        self.written = 0  # rows already in metrics.csv: later epochs append theirs

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]  # the lr this epoch trains with (schedulers step later)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.samples += len(batch[1]) * trainer.world_size  # DDP: every rank trains an equal share

    def elapsed(self) -> float:
        """Seconds of training so far, the part before a resume included."""
        return self.elapsed_before + (time.perf_counter() - self.started if self.started else 0.0)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self.add(trainer, pl_module, trainer.callback_metrics)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """An epoch that ends without validation (trainer.check_val_every_n_epoch, val_check_interval, max_steps)
        gets a row of its train metrics, asked of the module (Lightning calls this hook before the module's own)."""
        if self.rows and self.rows[-1]["step"] == steps_taken(trainer, pl_module):
            return  # the epoch ended with a validation, whose row has its train metrics
        values = getattr(pl_module, "train_metrics_since_validation", dict)()
        if values:
            self.add(trainer, pl_module, values)

    def add(self, trainer: pl.Trainer, pl_module: pl.LightningModule, logged: Mapping[str, Any]) -> None:
        """A row at the trainer's epoch and the steps taken; DDP: the other ranks hold the same synced rows."""
        self.record(trainer.current_epoch, steps_taken(trainer, pl_module), logged, trainer.is_global_zero)

    def record(self, epoch: int, step: int, logged: Mapping[str, Any], write: bool = True) -> None:
        """Add the row of a validation (or of an epoch without one) from its metrics (the COLUMNS it has) and append
        it to metrics.csv."""
        row = {
            "epoch": epoch,
            "step": step,
            "time_s": round(self.elapsed(), 4),
            **{key: float(logged[key]) for key in COLUMNS if key in logged},
            "lr": self.lr,
        }
        self.rows.append(row)
        if write:
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
            "samples": self.samples,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = _unpacked(state_dict) if "values" in state_dict else list(state_dict["rows"])  # or as dicts
        self.written = 0
        self.elapsed_before = float(state_dict["elapsed"])
        self.lr = state_dict.get("lr", self.lr)  # a mid-epoch resume skips on_train_epoch_start
        self.samples = int(state_dict.get("samples", 0))

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

    def best(self, monitor: str = "val/acc", mode: str = "max") -> dict[str, float] | None:
        """The row with the best `monitor` (the highest with mode max), the first one on ties, as ModelCheckpoint
        keeps it; None when no row has it."""
        scored = [row for row in self.rows if math.isfinite(row.get(monitor, math.nan))]
        if not scored:
            return None
        pick = max if mode == "max" else min
        return pick(scored, key=lambda row: row[monitor])


def _unpacked(state: dict[str, Any]) -> list[dict[str, float]]:
    """EpochHistory's rows back from their packed form: the values each row had, epoch and step as ints."""
    rows = []
    for values, present in zip(state["values"].tolist(), state["present"].tolist(), strict=True):
        row = {key: value for key, value, has in zip(state["columns"], values, present, strict=True) if has}
        rows.append({key: int(value) if key in INTEGER_COLUMNS else value for key, value in row.items()})
    return rows


class StepLosses(pl.Callback):
    """Writes the training loss of every optimizer step to `steps.csv` (`epoch`, `step`, `loss`): with
    `trainer.accumulate_grad_batches`, the sum of its batches' losses, each divided by their number by Lightning
    (the loss whose gradient the step takes).

    The losses stay on the device and are read back in one transfer at each epoch's end and before each full
    checkpoint (so that steps.csv holds every step up to a checkpoint a run may resume from): no per-step
    synchronisation and no per-step `self.log`. A resume keeps the rows up to its checkpoint's step
    (`descent.resume.carry_over`) and appends the rest. The rows end before the first NaN or infinite loss: that
    step, and those skipped after it until the run stopped (Classifier.training_step), were not taken.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.losses: list[torch.Tensor] = []
        self.steps: list[tuple[int, int]] = []  # (epoch, step) of each loss
        self.window: list[torch.Tensor] = []  # the losses of the batches since the last optimizer step
        self.stepped = False
        self.ended = False  # a non-finite loss was read: no step after it is a row

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and (trainer.ckpt_path is None or not self.path.is_file()):  # a resume appends
            self.path.write_text("epoch,step,loss\n")

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.stepped = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else None
        if loss is not None:
            self.window.append(loss)
        if self.stepped and self.window:
            self.losses.append(self.window[0] if len(self.window) == 1 else torch.stack(self.window).sum())
            self.steps.append((trainer.current_epoch, trainer.global_step))
            self.window = []
        self.stepped = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.write(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.write(trainer)  # an interrupted epoch keeps its steps so far; a resume appends the rest

    def write(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero and self.losses and not self.ended:  # DDP: the losses of rank 0's batches
            losses = torch.stack(self.losses).tolist()
            taken = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), len(losses))
            self.ended = taken < len(losses)
            rows = zip(self.steps[:taken], losses[:taken], strict=True)
            with open(self.path, "a") as file:
                file.writelines(f"{epoch},{step},{loss!r}\n" for (epoch, step), loss in rows)
        self.losses, self.steps = [], []

    def state_dict(self) -> dict[str, Any]:
        return {"ended": self.ended}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ended = bool(state_dict.get("ended", False))


class LastCheckpoint(ModelCheckpoint):
    """last.ckpt, the whole training state a run resumes from: written on Lightning's cadence (`train_time_interval`,
    `every_n_epochs` or `every_n_train_steps`, as ModelCheckpoint takes them), at the validation after which fit
    stops, at the batch after which it stops mid-epoch (max_steps, max_time, a divergence), at the end of a fit
    that ends with its epoch, and on a signal (GracefulStop)."""

    written_at: tuple[int, int] | None = None  # (global step, validations) of the last full checkpoint of this fit
    validations = 0  # of this fit

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.written_at, self.validations = None, 0

    def path(self) -> Path:
        return Path(self.dirpath or ".") / f"{self.filename or self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.written_at = (trainer.global_step, self.validations)  # any full checkpoint: this callback's, a signal's

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stops = out_of_steps(trainer) or (trainer.should_stop and can_stop(trainer))
        if stops and not trainer.fast_dev_run and mid_epoch(trainer):  # fast_dev_run writes no checkpoint
            self.write(trainer)  # a validation may still follow: it writes again

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING:
            return
        self.validations += 1
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        if trainer.should_stop or out_of_steps(trainer) or (last_epoch and not mid_epoch(trainer)):
            self.write(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not trainer.fast_dev_run and not mid_epoch(trainer):  # fast_dev_run writes no checkpoint
            self.write(trainer)

    def write(self, trainer: pl.Trainer) -> None:
        if self.written_at != (trainer.global_step, self.validations):
            trainer.save_checkpoint(self.path(), weights_only=False)


def out_of_steps(trainer: pl.Trainer) -> bool:
    return 0 < trainer.max_steps <= trainer.global_step


def can_stop(trainer: pl.Trainer) -> bool:
    """Whether a `trainer.should_stop` ends fit now: `trainer.min_epochs` and `min_steps` are met (Lightning's rule)."""
    loop = trainer.fit_loop
    return loop.epoch_progress.current.processed >= (loop.min_epochs or 0) and trainer.global_step >= (
        loop.min_steps or 0
    )


def mid_epoch(trainer: pl.Trainer) -> bool:
    """Whether the training loader stopped before the end of its epoch (our loaders count the batches served)."""
    loader = trainer.train_dataloader
    served = getattr(loader, "served", None)
    return served is not None and 0 < served < len(loader)


class RunState(pl.Callback):
    """Puts in every checkpoint what Lightning leaves out and an exact resume needs: the RNG states at the moment
    of saving, the run's config as composed (unresolved, so `${oc.env:...}` stays a reference, never a value) and its
    command-line overrides. Restoring puts the RNG states back before the first resumed batch, and points the
    checkpoint and early-stopping states at this run (its folder, its patience)."""

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

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Before the callbacks load their states (Lightning calls every on_load_checkpoint first): the checkpoint
        callbacks' states are pointed at this run's checkpoints folder (a resume into a new folder: Lightning's
        ModelCheckpoint reloads its best score only when its folder is unchanged, and would overwrite the copied
        best.ckpt with a worse one), and early stopping gets this run's patience (Lightning restores the saved one)."""
        states = checkpoint.get("callbacks") or {}
        for callback in trainer.checkpoint_callbacks:
            state = states.get(callback.state_key)
            if isinstance(callback, ModelCheckpoint) and state and state.get("dirpath") != callback.dirpath:
                states[callback.state_key] = relocated(state, callback.dirpath)
        for callback in trainer.early_stopping_callbacks:
            if state := states.get(callback.state_key):
                state["patience"] = callback.patience


def relocated(state: dict[str, Any], dirpath: str | None) -> dict[str, Any]:
    """A ModelCheckpoint state whose paths under its `dirpath` now lie under `dirpath` (same file names)."""
    old = state.get("dirpath")

    def moved(path: Any) -> Any:
        if not old or not dirpath or not isinstance(path, str) or not path.startswith(old):
            return path
        return str(Path(dirpath) / Path(path).relative_to(old))

    state = dict(state, dirpath=dirpath)
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in state:
            state[key] = moved(state[key])
    if "best_k_models" in state:
        state["best_k_models"] = {moved(path): score for path, score in state["best_k_models"].items()}
    return state


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

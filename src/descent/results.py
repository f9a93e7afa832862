"""What a run leaves on disk: metrics.csv (one row per epoch), steps.csv (the training loss of every step) and
results.json (the best epoch's numbers)."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

COLUMNS = (
    "epoch",
    "step",
    "time_s",
    "train/loss",
    "train/acc",
    "train/f1",
    "val/loss",
    "val/acc",
    "val/f1",
    "lr",
)
INTEGER_COLUMNS = ("epoch", "step")  # written as ints in metrics.csv


class EpochHistory(pl.Callback):
    """Records each epoch's metrics and writes `metrics.csv` as it goes, whatever the logger.

    Written by hand because Lightning's CSVLogger writes one row per log call (so train, val and lr land on separate
    rows), and deletes an existing metrics.csv when a run resumes into its folder. The rows travel in checkpoints.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, float]] = []
        self._elapsed_before = 0.0  # training seconds of the run before a resume
        self._started = 0.0
        self._lr = float("nan")
        self._written = 0  # rows already in metrics.csv: later epochs append theirs
        self._packed = _no_rows()  # the first rows as state_dict packed them: (values, present)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]  # the lr this epoch trains with (schedulers step later)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        logged = trainer.callback_metrics
        row = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "time_s": round(self._elapsed_before + time.perf_counter() - self._started, 4),
            **{key: float(logged[key]) for key in COLUMNS if key in logged},
            "lr": self._lr,
        }
        self.rows.append(row)
        if trainer.is_global_zero:  # DDP: the other ranks hold the same synced rows
            self.write()

    def write(self) -> None:
        """Append the new rows; the first write of a fit (and of a resume, whose rows come from its checkpoint)
        rewrites the file whole."""
        with open(self.path, "a" if self._written else "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS, extrasaction="ignore")
            if not self._written:
                writer.writeheader()
            writer.writerows(self.rows[self._written :])
        self._written = len(self.rows)

    def state_dict(self) -> dict[str, Any]:
        """The rows as one float64 tensor over COLUMNS and a mask of the values each row has: as dicts, torch.save
        would pickle ~23 objects a row, and every epoch's last.ckpt would take longer to write than the one before
        (+0.6 ms at epoch 200). Rows already packed are kept, so a save packs only the new ones."""
        elapsed = self._elapsed_before + (time.perf_counter() - self._started if self._started else 0.0)
        values, present = self._packed
        if len(values) < len(self.rows):
            new = self.rows[len(values) :]
            values = torch.cat([values, torch.tensor([[row.get(key, math.nan) for key in COLUMNS] for row in new],
                                                     dtype=torch.float64)])  # fmt: skip
            present = torch.cat([present, torch.tensor([[key in row for key in COLUMNS] for row in new])])
            self._packed = values, present
        return {"columns": list(COLUMNS), "values": values, "present": present, "elapsed": elapsed, "lr": self._lr}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = _unpacked(state_dict) if "values" in state_dict else list(state_dict["rows"])  # or as dicts
        self._packed = _no_rows()
        self._written = 0
        self._elapsed_before = float(state_dict["elapsed"])
        self._lr = state_dict.get("lr", self._lr)  # a mid-epoch resume skips on_train_epoch_start

    def best(self) -> dict[str, float] | None:
        """The row with the highest val/acc, the first one on ties, as ModelCheckpoint(mode=max) keeps it."""
        scored = [row for row in self.rows if math.isfinite(row.get("val/acc", math.nan))]
        return max(scored, key=lambda row: row["val/acc"]) if scored else None


def _no_rows() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(0, len(COLUMNS), dtype=torch.float64), torch.zeros(0, len(COLUMNS), dtype=torch.bool)


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
    synchronisation, no per-step `self.log` (each costs ~0.35 ms a step here).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._losses: list[torch.Tensor] = []
        self._steps: list[int] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and (trainer.ckpt_path is None or not self.path.is_file()):  # a resume appends
            self.path.write_text("epoch,step,loss\n")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        loss = outputs.get("loss") if isinstance(outputs, dict) else None
        if loss is not None:
            self._losses.append(loss)
            self._steps.append(trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._write(trainer)  # an interrupted epoch keeps its steps so far; a resume appends the rest

    def _write(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:  # DDP: steps.csv holds the losses of rank 0's batches
            self._losses, self._steps = [], []
            return
        losses = torch.stack(self._losses).tolist() if self._losses else []
        with open(self.path, "a") as file:
            file.writelines(
                f"{trainer.current_epoch},{step},{loss!r}\n" for step, loss in zip(self._steps, losses, strict=True)
            )
        self._losses, self._steps = [], []


def peak_rss_mb() -> float:
    """The process's peak resident memory in MB (Linux reports kilobytes)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_gpu_mb() -> float | None:
    """The peak GPU memory torch allocated in this process, in MB; None without a GPU in use."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def is_rank_zero() -> bool:
    """False in the other processes of a DDP run, which must not write the run's files a second time."""
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


@contextlib.contextmanager
def recorded(path: Path, results: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Write `results` to the results.json at `path` whatever happens inside: what the run adds (status ok or
    diverged), or `failed`/`interrupted` with the error; then the duration and peak memory. Rank 0 writes it."""
    from descent.config import ConfigError
    from descent.reliability import Interrupted

    started = time.perf_counter()
    try:
        yield results
    except Interrupted as stop:  # SIGTERM/SIGINT: last.ckpt is written; the process exits with 128 + the signal
        results |= {"status": "interrupted", "error": str(stop)}
        raise
    except ConfigError as error:
        results["error"] = str(error)
        raise
    except Exception as error:
        results["error"] = f"{type(error).__name__}: {error}"
        raise
    finally:
        results["duration_s"] = round(time.perf_counter() - started, 3)
        results["peak_rss_mb"] = peak_rss_mb()
        if (gpu_mb := peak_gpu_mb()) is not None:
            results["peak_gpu_mb"] = gpu_mb
        if is_rank_zero():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_results(path, results)


def _finite(value: Any) -> Any:
    """JSON has no NaN: a diverged metric is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(_finite(results), indent=2) + "\n")


def read_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())

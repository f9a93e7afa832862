"""Lightning's callbacks with the per-step costs a run does not need removed; what they do and save is unchanged.

Lightning calls every callback's hook ~6 times a training step, building a name from the callback's `state_key`
for its profiler each time, and the progress bar updates its task after every batch: together ~30 us a step,
~5% of an epoch at batch 1 on 2 cores (`python scripts/bench.py`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning import callbacks
from pytorch_lightning.callbacks.progress import rich_progress


class StateKeyOnce:
    """Builds a callback's `state_key` once: Lightning formats the callback's settings into a string at every hook
    call (~0.8 us, ~6 times a step per callback). The settings in it are fixed by __init__, and the key is the same
    string, so checkpoints of Lightning's class and of ours load into either."""

    @property
    def state_key(self) -> str:
        if "_state_key" not in self.__dict__:
            self.__dict__["_state_key"] = super().state_key
        return self.__dict__["_state_key"]


class ModelCheckpoint(StateKeyOnce, callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, its `state_key` built once."""


class EarlyStopping(StateKeyOnce, callbacks.EarlyStopping):
    """Lightning's EarlyStopping, its `state_key` built once."""


# Lightning's refresh thread for its RichProgressBar (private); a plain Thread stands in if it is renamed, and then
# RichProgressBar keeps Lightning's thread
_LightningRefreshThread = getattr(rich_progress, "_RefreshThread", threading.Thread)


class PromptRefreshThread(_LightningRefreshThread):
    """Lightning's refresh thread (it redraws when the bar asks, at most `refresh_per_second` times a second), whose
    pause ends as soon as it is stopped: Lightning's sleeps, and the bar's stop waits for it, up to 1/refresh_rate s
    (0.1 s) at the end of each fit and test, ~4% of a 3-epoch `python train.py`."""

    def run(self) -> None:
        while not self.done.wait(1 / self.refresh_per_second):
            if self.refresh_cond:
                with self.live._lock:
                    if not self.done.is_set():
                        self.live.refresh()
                self.refresh_cond = False


class RichProgressBar(callbacks.RichProgressBar):
    """Lightning's RichProgressBar, drawn by its refresh thread only, `refresh_rate` times a second:
    - rich draws the whole bar at once when a task is added or reset, which Lightning does twice an epoch (a new
      validation task, the training task reset): ~1.1 ms each on a terminal, ~10% of a full-batch epoch here. Those
      draws are left to the refresh thread, which draws the latest state within 1/refresh_rate s;
    - its training task is updated at most once per redraw, and at each epoch's first and last batch (its speed, it/s,
      is measured between updates), instead of after every batch (~15 us a step);
    - its refresh thread is a PromptRefreshThread, so that the bar stops at once at the end of fit and test.
    Both go through Lightning's private parts, guarded: if those change, the bar behaves as Lightning's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_update = 0.0  # perf_counter time of the next redraw that would show an update

    def _init_progress(self, trainer: pl.Trainer) -> None:
        super()._init_progress(trainer)
        deferred = getattr(self.progress, "soft_refresh", None)  # asks Lightning's refresh thread for a redraw
        if deferred is not None:
            self.progress.refresh = deferred
        live = getattr(self.progress, "live", None)
        started = getattr(live, "_refresh_thread", None)
        if type(started) is _LightningRefreshThread:  # just started by Lightning (not when the bar is reused)
            started.stop()  # it ends after its current pause, which nothing waits for
            live._refresh_thread = PromptRefreshThread(live, live.refresh_per_second)
            live._refresh_thread.start()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        now = time.perf_counter()
        if now < self._next_update and 0 < batch_idx < self.total_train_batches - 1:
            return
        self._next_update = now + 1 / self.refresh_rate if self.refresh_rate > 0 else 0.0
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

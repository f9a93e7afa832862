"""Lightning's fixed costs that a run does not use, removed without changing what the run computes."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from pytorch_lightning.profilers import PassThroughProfiler

_NO_CONTEXT = contextlib.nullcontext()


class NoProfiler(PassThroughProfiler):
    """What `trainer.profiler: null` gets: no profiling, at no cost.

    Lightning wraps each hook call in `profiler.profile(name)`, ~50 a training step, and even its do-nothing
    PassThroughProfiler opens a generator-based context manager there (~0.6 us each); this one hands back one shared
    `nullcontext`."""

    def profile(self, action_name: str) -> Any:
        return _NO_CONTEXT


def already_on(batch: Any, device: torch.device) -> bool:
    """Whether `batch` is a tuple of tensors on `device` already, which Lightning's generic move (~8 us a step, a
    walk of the batch) would leave as they are."""
    return isinstance(batch, tuple) and all(isinstance(part, torch.Tensor) and part.device == device for part in batch)


class LeanHooks:
    """LightningModule mixin (before `pl.LightningModule` in the bases): two of Lightning's per-step costs cut.
    - Lightning sets `_current_fx_name` on the module around each of its ~45 hook calls a step; nn.Module's checks
      for parameters, buffers and submodules cost ~0.9 us a time there, and a hook's name is never one of those;
    - Lightning runs its gradient clipping hook every step, whose checks cost ~7 us even with no clipping
      configured; with no `trainer.gradient_clip_val` it returns at once (with one, Lightning clips as usual)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:  # fmt: skip
        if gradient_clip_val:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

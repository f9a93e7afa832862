"""Replicates trained at once (`replicates_vectorized: true`): the k replicates of one setting as one batched model
(descent.batched) in one process, through Lightning's Trainer, each written to its folder `replicate_<i>/` with the
files and fields of a replicate trained on its own.

Replicate i starts as a run of seed + i starts: its Classifier built after `seed_everything(seed + i)`, its dropout
masks drawn from a generator at the RNG state that run has at its first step, its batches in that run's order
(ReplicateBatches). Its metrics, best epoch, best weights, early stopping and divergence are its own: a replicate that
stops (diverged, or stopped early) keeps the state it stopped with while the others train on, and the run stops when
all have. Which replicates train on is kept on the device, so that a replicate's divergence costs no host read per step
on an accelerator (BatchedClassifier.training_step). The run's own `checkpoints/last.ckpt` is the batched training
state, what a resume reads.
Nothing here may let one replicate's numbers depend on another's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from descent.batched import BatchedNet, clip_grad_norm_per_replicate, is_elementwise
from descent.callbacks import EpochHistory, GracefulStop, StepLosses
from descent.config import SEQUENTIALLY, ConfigError
from descent.data.batches import ReplicateBatches
from descent.data.datamodule import ImageDataModule
from descent.model import (
    DIVERGENCE_READ_EVERY,
    METRIC_FLUSH_STEPS,
    PENDING_KEY,
    Classifier,
    partial_metrics_kept,
    reads_every_step,
    stage_metrics,
)
from descent.optim import build_lr_scheduler, build_optimizer

log = logging.getLogger("descent")
STAGES = ("train", "val", "test")
STATE_KEY = "descent_replicates"  # where a checkpoint keeps which replicates stopped, when, and why


class ReplicatesDataModule(ImageDataModule):
    """ImageDataModule whose training batches are the k replicates' own, stacked (ReplicateBatches); validation and
    test batches are shared (every replicate is evaluated on the same samples)."""

    def __init__(
        self,
        source: Any,
        split: Any,
        batch_size: int,
        eval_batch_size: int,
        seeds: Sequence[int],
        stream: Any = None,
    ) -> None:
        super().__init__(source, split, batch_size, eval_batch_size, seeds[0], stream=stream)
        self.seeds = list(seeds)

    def train_dataloader(self) -> ReplicateBatches:
        return ReplicateBatches(*self.tensors["train"], self.batch_size, self.seeds)


class BatchedClassifier(pl.LightningModule):
    """k Classifiers of one configuration as one LightningModule over a BatchedNet: the pixels standardized as theirs
    (the split's statistics, shared), each replicate's metrics by its own torchmetrics, fed as a Classifier feeds
    them. Training batches are (k, B, ...) stacks; validation and test batches are shared (B, ...) batches."""

    def __init__(
        self, classifiers: Sequence[Classifier], generators: Sequence[torch.Generator], read_every: int = 1
    ) -> None:
        super().__init__()
        first = classifiers[0]
        self.k = len(classifiers)
        self.read_every = read_every  # training steps between two host reads of which replicates diverged
        self.replicate_hparams = dict(first.hparams)  # each replicate's Classifier's, as its checkpoints hold them
        self.input_dims = len(first.hparams["input_shape"])
        self.register_buffer("mean", first.mean.clone())
        self.register_buffer("std", first.std.clone())
        self.net = BatchedNet([classifier.net for classifier in classifiers], generators)
        classes = first.hparams["num_classes"]
        self.train_metrics = nn.ModuleList(stage_metrics(classes) for _ in classifiers)
        self.val_metrics = nn.ModuleList(stage_metrics(classes) for _ in classifiers)
        self.test_metrics = nn.ModuleList(stage_metrics(classes) for _ in classifiers)
        self.test_confusion = nn.ModuleList(
            MulticlassConfusionMatrix(classes, validate_args=False) for _ in classifiers
        )
        self.stopped: list[int | None] = [None] * self.k  # the optimizer steps of a replicate that stopped
        self.stop_epoch: list[int | None] = [None] * self.k
        self.diverged_at: list[int | None] = [None] * self.k  # the global step whose loss was NaN or infinite
        self.epoch_values: list[dict[str, float]] = []  # each replicate's metrics of the last validation
        self.tested: list[dict[str, float]] = []
        self.confusions: list[torch.Tensor] = []
        # on the device: which replicates train on, and the global step of each one's first NaN or infinite loss
        # (-1: none); the host's lists above learn them at each read (read_flags)
        self.register_buffer("training_mask", torch.ones(self.k, dtype=torch.bool), persistent=False)
        self.register_buffer("nonfinite_step", torch.full((self.k,), -1, dtype=torch.long), persistent=False)
        self.held: list[torch.Tensor] = []  # net's stacked tensors (state_tensors) as the stopped replicates are kept
        # per stage: (per-sample losses, predictions, labels) each (k, B), and for training steps the (k,) mask of
        # the replicates that took the step
        self._pending: dict[str, list[tuple[Any, ...]]] = {stage: [] for stage in STAGES}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(k, B, ...) images, replicate i's at [i], or (B, ...) images shared by all: (k, B, classes) logits."""
        shared = images.dim() == self.input_dims + 1
        x = (images.flatten(1 if shared else 2) - self.mean) / self.std
        return self.net(x.expand(self.k, *x.shape) if shared else x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        """The (k, B) per-sample losses of a batch, kept with its predictions for the stage's metrics."""
        images, labels = batch
        logits = self(images)
        labels = labels.expand(self.k, -1) if labels.dim() == 1 else labels
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(self.k, -1)
        taken = self.training_mask.clone() if stage == "train" else None
        pending = self._pending[stage]
        pending.append((losses.detach(), logits.detach().argmax(dim=2), labels, taken))
        if len(pending) >= METRIC_FLUSH_STEPS:
            self._flush(stage)
        return losses

    def _flush(self, stage: str) -> None:
        """Feed each replicate's torchmetrics the pending steps it took, in one update each, as a Classifier does. A
        replicate stops for good, so the steps it took are the first ones of the pending list."""
        pending = self._pending[stage]
        if not pending:
            return
        losses, predictions, labels = (torch.cat(parts, dim=1) for parts in list(zip(*pending, strict=True))[:3])
        sizes = [step[0].shape[1] for step in pending]
        if stage == "train":  # the samples each replicate took: one host read per flush
            taken = torch.stack([step[3] for step in pending])
            counts = (taken * torch.tensor(sizes, device=taken.device).unsqueeze(1)).sum(dim=0).tolist()
        else:
            counts = [sum(sizes)] * self.k
        for i, metrics in enumerate(getattr(self, f"{stage}_metrics")):
            n = counts[i]
            if n == 0:
                continue
            metrics["loss"].update(losses[i, :n])
            metrics["acc"].update(predictions[i, :n], labels[i, :n])
            metrics["f1"].update(predictions[i, :n], labels[i, :n])
            if stage == "test":
                self.test_confusion[i].update(predictions[i, :n], labels[i, :n])
        pending.clear()

    def _compute(self, stage: str) -> list[dict[str, float]]:
        """Each replicate's metrics of the stage's epoch (empty for one that took no step of it), then reset."""
        self._flush(stage)
        values = []
        for metrics in getattr(self, f"{stage}_metrics"):
            computed = metrics.compute().items() if metrics["loss"].update_count else ()
            values.append({f"{stage}/{name}": float(value) for name, value in computed})
            metrics.reset()
        return values

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, Any] | None:
        """The sum of the training replicates' mean losses: replicate i's gradient is its own loss's. A replicate
        whose loss is NaN or infinite stops there, this step not applied to it (optimizer_step puts it back), and the
        others train on; when none does, the run stops.

        The check stays on the device (training_mask, nonfinite_step). The host reads it every `read_every` steps and
        at the epoch's last batch. Until then the device keeps every training replicate's state of this step (`hold`)
        and puts back the stopped ones after the optimizer step, whether the host knows of them yet or not. With
        `read_every=1` (on CPU, where a read costs nothing) the host knows at once and only a stopped replicate is
        held and put back."""
        losses = self._step(batch, "train").mean(dim=1)
        finite = torch.isfinite(losses.detach())
        self.nonfinite_step.masked_fill_(self.training_mask & ~finite, self.global_step)
        if self.read_every > 1:
            self.hold(self.training_mask)  # what a replicate whose loss is non-finite here is kept at
        self.training_mask &= finite
        last = batch_idx + 1 == self.trainer.num_training_batches
        if self.read_every == 1 or (batch_idx + 1) % self.read_every == 0 or last:
            self.read_flags()
        if all(steps is not None for steps in self.stopped):  # the host knows every replicate stopped
            self.trainer.should_stop = True
            return None
        total = torch.where(self.training_mask, losses, 0.0).sum()
        return {"loss": total, "losses": losses.detach()}

    def read_flags(self) -> None:
        """The host learns which replicates' losses turned NaN or infinite (one transfer). Each stops after its
        non-finite step, which counts as a run's skipped step counts, as Lightning counts it."""
        for i, step in enumerate(self.nonfinite_step.tolist()):
            if step >= 0 and self.diverged_at[i] is None:
                self.diverged_at[i] = step
                self.stopped[i], self.stop_epoch[i] = step + 1, self.current_epoch
                if self.read_every == 1:  # read at its step: kept as it is now, as `hold` keeps it otherwise
                    self.hold_replicate(i)

    def stop(self, i: int, steps: int) -> None:
        """Stop replicate i after `steps` optimizer steps (early stopping): from now on it is kept as it is now."""
        self.stopped[i], self.stop_epoch[i] = steps, self.current_epoch
        self.training_mask[i] = False
        self.hold_replicate(i)

    def state_tensors(self) -> list[torch.Tensor]:
        """The stacked parameters and buffers of the net, (k, ...) each: what a replicate's state is."""
        return [*self.net.parameters(), *self.net.buffers()]

    @torch.no_grad()
    def hold(self, which: torch.Tensor) -> None:
        """Keep the present state of the replicates of `which`, a (k,) mask on the device."""
        for tensor, held in zip(self.state_tensors(), self.held, strict=True):
            torch.where(along_replicates(which, tensor), tensor, held, out=held)

    @torch.no_grad()
    def hold_replicate(self, i: int) -> None:
        """Keep replicate i's present state."""
        for tensor, held in zip(self.state_tensors(), self.held, strict=True):
            held[i].copy_(tensor[i])

    @torch.no_grad()
    def put_back(self) -> None:
        """The stopped replicates back to their held state: the optimizer step and batch norm's running statistics
        moved them. On the device's mask while the host may not know of all of them yet, else by their slices."""
        if self.read_every > 1:
            for tensor, held in zip(self.state_tensors(), self.held, strict=True):
                torch.where(along_replicates(self.training_mask, tensor), tensor, held, out=tensor)
            return
        for i in (i for i, steps in enumerate(self.stopped) if steps is not None):
            for tensor, held in zip(self.state_tensors(), self.held, strict=True):
                tensor[i].copy_(held[i])

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable[[], Any] | None = None
    ) -> None:
        """Lightning's optimizer step, then the stopped replicates put back, before any callback sees the step."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.put_back()

    def on_train_start(self) -> None:
        """The held states start as the present ones: a resumed checkpoint has its stopped replicates put back."""
        self.held = [tensor.detach().clone() for tensor in self.state_tensors()]

    def on_validation_start(self) -> None:
        """The host knows every divergence before the validation's records and early stopping read `stopped`."""
        if self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking:
            self.read_flags()

    def on_train_end(self) -> None:
        self.read_flags()  # a fit that stopped between two reads (max_steps, a signal)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        """Each replicate's train and val metrics of the epoch (`epoch_values`, what ReplicateRecords writes), and to
        the loggers those of the replicates still recording, as `<metric>/replicate_<i>`."""
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        train = self._compute("train") if fitting else [{}] * self.k
        self.epoch_values = [val | own for val, own in zip(self._compute("val"), train, strict=True)]
        if fitting and not self.trainer.sanity_checking:
            recording = [i for i in range(self.k) if self.stop_epoch[i] in (None, self.current_epoch)]
            self._log_per_replicate([self.epoch_values[i] for i in recording], recording)

    def on_test_epoch_end(self) -> None:
        self.tested = self._compute("test")
        self._log_per_replicate(self.tested, list(range(self.k)))
        self.confusions = [confusion.compute().cpu() for confusion in self.test_confusion]
        for confusion in self.test_confusion:
            confusion.reset()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """As Classifier.state_dict: the metric states only while they hold an epoch's partial sums."""
        with partial_metrics_kept([*self.train_metrics, *self.val_metrics, *self.test_metrics]):
            return super().state_dict(*args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The pending steps (as Classifier keeps them) and which replicates stopped, when, and why, with the device's
        flags the host may not have read yet."""
        pending = {stage: list(steps) for stage, steps in self._pending.items() if steps}
        if pending:
            checkpoint[PENDING_KEY] = pending
        checkpoint[STATE_KEY] = {
            "stopped": self.stopped,
            "stop_epoch": self.stop_epoch,
            "diverged_at": self.diverged_at,
            "training": self.training_mask.tolist(),
            "nonfinite_step": self.nonfinite_step.tolist(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        device = self.mean.device
        saved = checkpoint.get(PENDING_KEY, {})
        self._pending = {
            stage: [tuple(None if part is None else part.to(device) for part in step) for step in saved.get(stage, [])]
            for stage in STAGES
        }
        state = checkpoint[STATE_KEY]
        self.stopped, self.stop_epoch = list(state["stopped"]), list(state["stop_epoch"])
        self.diverged_at = list(state["diverged_at"])
        # a checkpoint of an earlier version holds what the host knew only, which was all there was
        training = state.get("training", [steps is None for steps in self.stopped])
        nonfinite = state.get("nonfinite_step", [-1 if step is None else step for step in self.diverged_at])
        self.training_mask.copy_(torch.tensor(training))
        self.nonfinite_step.copy_(torch.tensor(nonfinite))

    def configure_optimizers(self) -> Any:
        """One optimizer over the stacked parameters: each replicate's own update when it is element-wise."""
        optimizer = build_optimizer(self.replicate_hparams["optimizer"], self.parameters())
        if not is_elementwise(type(optimizer)):  # config.check_vectorized refuses it first, naming the key
            raise ConfigError("optimizer._target_", type(optimizer).__name__, f"not element-wise; {SEQUENTIALLY}")
        scheduler = self.replicate_hparams["scheduler"]
        return (
            {"optimizer": optimizer, "lr_scheduler": build_lr_scheduler(scheduler, optimizer)}
            if scheduler
            else optimizer
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Any = None,
    ) -> None:
        """`trainer.gradient_clip_val` per replicate: by norm, each replicate's norm over its own gradients; by value,
        element by element (each replicate's own anyway)."""
        if not gradient_clip_val:
            return
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(parameters, gradient_clip_val)
        else:
            clip_grad_norm_per_replicate(parameters, gradient_clip_val)

    def _log_per_replicate(self, values: Sequence[dict[str, float]], replicates: Sequence[int]) -> None:
        """Straight to the loggers, once an epoch: `self.log` would move and reduce each of the k x 6 values alone."""
        if not self.loggers:
            return
        pairs = zip(replicates, values, strict=True)
        metrics = {f"{key}/replicate_{i}": value for i, own in pairs for key, value in own.items()}
        for logger in self.loggers:
            logger.log_metrics({**metrics, "epoch": self.current_epoch}, step=self.global_step)

    def replicate_checkpoint(self, i: int, epoch: int, steps: int) -> dict[str, Any]:
        """Replicate i as a Classifier's weights-only checkpoint (best.ckpt's format): what eval.py and
        `Classifier.load_from_checkpoint` read."""
        state = {"mean": self.mean.clone(), "std": self.std.clone()}
        state |= {f"net.{name}": tensor for name, tensor in self.net.replicate_state_dict(i).items()}
        return {
            "epoch": epoch,
            "global_step": steps,
            "pytorch-lightning_version": pl.__version__,
            "state_dict": state,
            "hparams_name": "kwargs",
            "hyper_parameters": self.replicate_hparams,
        }

    def load_replicate(self, i: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Put a Classifier's state_dict (a replicate's best.ckpt) into replicate i."""
        self.net.load_replicate_state_dict(
            i, {k.removeprefix("net."): v for k, v in state_dict.items() if k.startswith("net.")}
        )


def along_replicates(mask: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """A (k,) mask shaped to select the slices [i] of a stacked (k, ...) tensor (torch.where broadcasts it)."""
    return mask.view(-1, *[1] * (tensor.dim() - 1))


def improves(current: float, best: float | None, mode: str) -> bool:
    """ModelCheckpoint's rule for its one best checkpoint: the first epoch, then strictly better (NaN never is)."""
    return best is None or (current > best if mode == "max" else current < best)


class ReplicateRecords(pl.Callback):
    """What a run's own callbacks and Lightning's ModelCheckpoint and EarlyStopping write and decide, per replicate:
    metrics.csv (EpochHistory), steps.csv (StepLosses), best.ckpt (`best`: callbacks.model_checkpoint's monitor and
    mode), and early stopping (`early_stopping`: callbacks.early_stopping's rules, as Lightning's EarlyStopping
    applies them). A replicate is recorded up to the epoch it stops in; the run stops when every replicate has."""

    def __init__(self, dirs: Sequence[Path], best: DictConfig | None, early_stopping: DictConfig | None) -> None:
        self.dirs = list(dirs)
        self.histories = [EpochHistory(folder / "metrics.csv") for folder in self.dirs]
        self.step_losses = [StepLosses(folder / "steps.csv") for folder in self.dirs]
        self.best = best
        self.best_scores: list[float | None] = [None] * len(self.dirs)
        self.best_paths = [""] * len(self.dirs)
        self.early = early_stopping
        if early_stopping is not None:
            self.sign = 1 if early_stopping.get("mode", "min") == "max" else -1  # Lightning's min_delta sign
            self.wait = [0] * len(self.dirs)
            self.early_best = [torch.tensor(-math.inf * self.sign)] * len(self.dirs)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for steps in self.step_losses:
            steps.on_fit_start(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for history in self.histories:
            history.on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for history in self.histories:
            history.on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: BatchedClassifier, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        losses = outputs.get("losses") if isinstance(outputs, dict) else None
        if losses is None:
            return
        for i, steps in enumerate(self.step_losses):
            # a replicate's diverged step is not in its steps.csv, as in a run's: the host may learn of it only some
            # steps later, and StepLosses ends the rows at the first non-finite loss
            if pl_module.stopped[i] is None:
                steps.losses.append(losses[i])
                steps.steps.append((trainer.current_epoch, trainer.global_step))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for steps in self.step_losses:
            steps.write(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        for steps in self.step_losses:
            steps.write(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: BatchedClassifier) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        epoch = trainer.current_epoch
        for i, values in enumerate(pl_module.epoch_values):
            if pl_module.stop_epoch[i] not in (None, epoch):
                continue  # stopped in an earlier epoch
            steps = pl_module.stopped[i] if pl_module.stopped[i] is not None else trainer.global_step
            self.histories[i].record(epoch, steps, values)
            if self.best is not None:
                self.keep_best(trainer, pl_module, i, values, steps)
            if self.early is not None and pl_module.stopped[i] is None and self.stops_early(i, values):
                pl_module.stop(i, trainer.global_step)
        if all(steps is not None for steps in pl_module.stopped):
            trainer.should_stop = True

    def keep_best(self, trainer: pl.Trainer, pl_module: BatchedClassifier, i: int, values: dict, steps: int) -> None:
        """Write replicate i's best.ckpt when its monitored metric improves, as ModelCheckpoint(save_top_k=1)."""
        mode, current = self.best.get("mode", "min"), values.get(self.best.monitor, math.nan)
        if not improves(current, self.best_scores[i], mode):
            return
        self.best_scores[i] = current if not math.isnan(current) else -math.inf if mode == "max" else math.inf
        path = self.dirs[i] / "checkpoints" / f"{self.best.get('filename') or 'best'}.ckpt"
        trainer.strategy.checkpoint_io.save_checkpoint(
            pl_module.replicate_checkpoint(i, trainer.current_epoch, steps), path
        )
        self.best_paths[i] = str(path)

    def stops_early(self, i: int, values: dict[str, float]) -> bool:
        """Lightning's EarlyStopping criteria for replicate i, on its own monitored value (float32, as logged)."""
        early = self.early
        current = torch.tensor(values.get(early.monitor, math.nan), dtype=torch.float32)
        better = torch.gt if self.sign == 1 else torch.lt
        stopping, divergence = early.get("stopping_threshold"), early.get("divergence_threshold")
        if early.get("check_finite", True) and not torch.isfinite(current):
            return True
        if stopping is not None and better(current, stopping):
            return True
        if divergence is not None and better(-current, -divergence):
            return True
        if better(current - self.sign * early.get("min_delta", 0.0), self.early_best[i]):
            self.early_best[i], self.wait[i] = current, 0
            return False
        self.wait[i] += 1
        return self.wait[i] >= early.get("patience", 3)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "histories": [history.state_dict() for history in self.histories],
            "best_scores": self.best_scores,
            "best_paths": self.best_paths,
        }
        if self.early is not None:
            state |= {"wait": self.wait, "early_best": self.early_best}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for history, state in zip(self.histories, state_dict["histories"], strict=True):
            history.load_state_dict(state)
        self.best_scores, self.best_paths = list(state_dict["best_scores"]), list(state_dict["best_paths"])
        if self.early is not None:
            self.wait, self.early_best = list(state_dict["wait"]), list(state_dict["early_best"])


def generator_of(seed: int, device: torch.device) -> torch.Generator:
    """The dropout generator of a replicate whose Classifier was just built after seed_everything(seed): on CPU at
    the global RNG's state now, the one a run of that seed draws its first masks from; on an accelerator seeded
    with the seed, as seed_everything seeds that device's generator."""
    if device.type == "cpu":
        generator = torch.Generator()
        generator.set_state(torch.get_rng_state())
        return generator
    return torch.Generator(device=device).manual_seed(seed)


def per_replicate(callbacks: DictConfig | None) -> tuple[list[str], DictConfig | None, DictConfig | None]:
    """The names of callbacks.* applied to each replicate on its own, and their configs: the monitored
    ModelCheckpoint (best.ckpt) and the EarlyStopping (config.check_vectorized has refused any other kind)."""
    from hydra.utils import get_class
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    names, best, early = [], None, None
    for name, callback in (callbacks or {}).items():
        if callback is None:
            continue
        cls = get_class(callback["_target_"])
        if issubclass(cls, ModelCheckpoint) and callback.get("monitor") is not None:
            names.append(name)
            best = callback
        elif issubclass(cls, EarlyStopping):
            names.append(name)
            early = callback
    return names, best, early


def fit_at_once(
    cfg: DictConfig,
    source: Any,
    split: Any,
    run_dir: Path,
    indices: Sequence[int],
    extra: Sequence[pl.Callback] = (),
    read_every: int | None = None,
) -> list[dict]:
    """Train replicates `indices` (seeds seed + i) at once into `run_dir/replicate_<i>/`, test each one's best epoch,
    and return each one's results.json content. The batched training state goes to `run_dir/checkpoints/last.ckpt`.
    `extra` callbacks run first (a probe: a benchmark's clock, a test's hook). `read_every`: the training steps
    between two host reads of which replicates diverged (BatchedClassifier), by default every step on CPU, where a
    read costs nothing, and every DIVERGENCE_READ_EVERY steps on an accelerator, where each one is a synchronisation."""
    from omegaconf import OmegaConf

    from descent.config import check_batch_size
    from descent.loggers import close_loggers
    from descent.plots import confusion_matrices
    from descent.replicates import summarize
    from descent.resume import stop_on_signal
    from descent.sweep import in_sweep
    from descent.train import build_model, data_line, draws_confusion_now, results_of_fit
    from descent.trainer import set_threads, trainer_with

    batch_size = check_batch_size(cfg.data.batch_size, len(split.train), cfg.model.get("batch_norm", False))
    seeds = [cfg.seed + i for i in indices]
    dirs = [run_dir / f"replicate_{i}" for i in indices]
    for folder in dirs:
        folder.mkdir(parents=True, exist_ok=True)
        split.save(folder / "split.npz")
    stream = cfg.data.get("stream")
    datamodule = ReplicatesDataModule(source, split, batch_size, cfg.data.eval_batch_size, seeds, stream)
    if datamodule.streaming:
        allowed = f"the replicates trained at once take in-memory data (a larger in_memory_mb); {SEQUENTIALLY}"
        raise ConfigError("data.stream.in_memory_mb", stream.in_memory_mb, allowed)
    names, best, early = per_replicate(cfg.callbacks)
    records = ReplicateRecords(dirs, best, early)
    stopper = GracefulStop(run_dir / "checkpoints" / "last.ckpt")
    shared = OmegaConf.create({name: c for name, c in (cfg.callbacks or {}).items() if name not in names})
    trainer = trainer_with(cfg, run_dir, [*extra, records], stopper, shared, job_type="replicates", in_sweep=in_sweep())
    if trainer.num_devices != 1:
        allowed = f"expected 1: the replicates trained at once are one process on one device; {SEQUENTIALLY}"
        raise ConfigError("trainer.devices", cfg.trainer.devices, allowed)

    device, classifiers, generators = trainer.strategy.root_device, [], []
    for seed in seeds:
        pl.seed_everything(seed, workers=True, verbose=False)  # replicate i = a run of seed + i
        classifiers.append(build_model(cfg, source, split))
        generators.append(generator_of(seed, device))
    if read_every is None:
        read_every = 1 if reads_every_step(device) else DIVERGENCE_READ_EVERY
    model = BatchedClassifier(classifiers, generators, read_every)
    # the threads a run of one replicate gets: the batched step is k of its small operations side by side, which a
    # second thread splits no better, and threads that other processes keep waiting cost far more than they gain
    threads = set_threads(cfg.threads, batch_size, classifiers[0], list(source.image_shape))
    log.info(
        "%d replicates at once (seeds %s): %s",
        len(seeds),
        ", ".join(map(str, seeds)),
        data_line(source, split, batch_size, threads),
    )
    stop_on_signal(
        lambda: trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True), stopper
    )

    steps = [s if s is not None else trainer.global_step for s in model.stopped]
    rows = [list(history.rows) for history in records.histories]
    io = trainer.strategy.checkpoint_io
    for j, folder in enumerate(dirs):  # each replicate's last weights, then its best ones for the test
        last_epoch = rows[j][-1]["epoch"] if rows[j] else 0
        io.save_checkpoint(model.replicate_checkpoint(j, last_epoch, steps[j]), folder / "checkpoints" / "last.ckpt")
    if best is None:
        log.warning("no best.ckpt (callbacks.model_checkpoint=null): testing the last epoch's weights")
    for j, path in enumerate(records.best_paths):
        if path:
            model.load_replicate(
                j, io.load_checkpoint(path, map_location=model.device, weights_only=True)["state_dict"]
            )
    trainer.test(model, datamodule=datamodule, verbose=False)

    results = []
    for j, seed in enumerate(seeds):
        history, diverged = records.histories[j], model.diverged_at[j] is not None
        if diverged:
            log.warning(
                "replicate %d (seed %d) diverged: its training loss became NaN or infinite at step %d; it stopped "
                "there and keeps the metrics of its best epoch so far, the others trained on",
                indices[j],
                seed,
                model.diverged_at[j],
            )
        tested_best = bool(records.best_paths[j])
        epochs = rows[j][-1]["epoch"] + 1 if rows[j] else 0
        answer = results_of_fit(
            rows[j],
            history.best(),
            model.tested[j],
            tested_best,
            seed=seed,
            steps=steps[j],
            samples=epochs * len(split.train),
            diverged=diverged,
            split=split,
            batch_size=batch_size,
            to_target=history.to_target(cfg.target.val_acc),
        )
        results.append(answer | {"vectorized": len(seeds)})
    for answer, matrix in zip(results, model.confusions, strict=True):
        answer["confusion"] = matrix.tolist()
    if draws_confusion_now(trainer.loggers):
        confusion_matrices([matrix.numpy() for matrix in model.confusions], [d / "confusion_matrix.png" for d in dirs])
    close_loggers(trainer.loggers, summarize([{**r, "seed": s} for r, s in zip(results, seeds, strict=True)]), None)
    return results

"""The networks (MLP, CNN) and their LightningModule, the Classifier: steps, metrics per stage, optimizers.

The module never names a network, an optimizer or a scheduler: it receives their Hydra configs as plain dicts (so
that a checkpoint loads with `torch.load(weights_only=True)`) and instantiates them (`descent.optim` builds the
optimizer in `configure_optimizers`).
Metrics are aggregated per epoch by torchmetrics; nothing is logged or synchronised per step. Each step only keeps
its per-sample losses, predictions and labels (on the device); torchmetrics gets them in one update every
`METRIC_FLUSH_STEPS` steps and at the end of the epoch: the same numbers as an update per step, for a fraction of
its cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from descent.optim import build_lr_scheduler, build_optimizer

METRIC_FLUSH_STEPS = 256  # bounds what waits for torchmetrics to 256 batches of predictions and labels
PENDING_KEY = "descent_pending_steps"  # where a mid-epoch checkpoint keeps the steps torchmetrics has not seen
DIVERGENCE_KEY = "descent_nonfinite"  # where a checkpoint taken after a non-finite loss, not yet read, keeps it
DIVERGENCE_READ_EVERY = 16  # batches between two host reads of the divergence flag, when the step skips on the device

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


class MLP(nn.Sequential):
    """[Linear -> BatchNorm1d -> activation -> Dropout] per hidden layer, then a Linear layer of class scores."""

    def __init__(
        self,
        input_shape: list[int],
        num_classes: int,
        hidden_dims: list[int],
        batch_norm: bool,
        dropout: float,
        activation: str,
    ) -> None:
        layers: list[nn.Module] = []
        width = math.prod(input_shape)
        for hidden in hidden_dims:
            # the bias is redundant before batch norm, whose shift beta plays its part
            layers.append(nn.Linear(width, hidden, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class CNN(nn.Module):
    """[Conv2d 3x3 -> BatchNorm2d -> activation -> Dropout -> MaxPool2d(2)] per entry of `channels`, then a Linear
    layer of class scores. Takes images flattened (as the Classifier standardizes them) and views them as
    (N, C, H, W); an (H, W) input shape is one channel. The pooling rounds up, so small images (digits' 8x8) take
    any number of blocks."""

    def __init__(
        self,
        input_shape: list[int],
        num_classes: int,
        channels: list[int],
        batch_norm: bool,
        dropout: float,
        activation: str,
    ) -> None:
        super().__init__()
        shape = list(input_shape) if len(input_shape) == 3 else [1, *input_shape]
        self.input_shape = tuple(shape)
        layers: list[nn.Module] = []
        width, height, side = shape
        for out in channels:
            layers.append(nn.Conv2d(width, out, kernel_size=3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            width, height, side = out, math.ceil(height / 2), math.ceil(side / 2)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * height * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(len(x), *self.input_shape)).flatten(1))


def skips_on_device(optimizer: Any, precision: str) -> bool:
    """Whether the optimizer skips a step on the device when told its gradients are not finite: torch's fused
    implementations read a `found_inf` tensor (GradScaler's protocol), unless GradScaler itself (16-bit mixed
    precision) sets it."""
    return bool(optimizer.defaults.get("fused")) and precision not in ("16-mixed", "16")


def reads_every_step(device: torch.device) -> bool:
    """Whether the divergence check reads its flag on the host at every step: on CPU a read costs nothing, on an
    accelerator each one is a synchronisation."""
    return device.type == "cpu"


def build_network(config: dict[str, Any], input_shape: list[int], num_classes: int) -> nn.Module:
    """The network of a `model` config (its `_target_`: MLP or CNN) for images of `input_shape`."""
    from hydra.utils import instantiate

    return instantiate(config, input_shape=list(input_shape), num_classes=num_classes, _convert_="all")


@contextmanager
def partial_metrics_kept(stages: Iterable[MetricCollection]) -> Iterator[None]:
    """Within it, the metric collections that hold partial sums (updated since their last reset) are persistent, so a
    state_dict taken there carries them; the others stay out of it."""
    partial = [metrics for metrics in stages if any(metric.update_count for metric in metrics.values())]
    for metrics in partial:
        metrics.persistent(True)
    try:
        yield
    finally:
        for metrics in partial:
            metrics.persistent(False)


def stage_metrics(num_classes: int) -> MetricCollection:
    """One stage's loss, accuracy and macro F1 (a Classifier's, and each replicate's of a BatchedClassifier)."""
    # validate_args=False: the inputs are ours and well-formed; the checks cost more than the update itself
    return MetricCollection(
        {
            "loss": MeanMetric(nan_strategy="disable"),  # a NaN loss must show, not be dropped
            "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
            "f1": MulticlassF1Score(num_classes, average="macro", validate_args=False),
        },
        compute_groups=False,
    )


class Classifier(pl.LightningModule):
    """Standardize the pixels (training-split statistics, kept as buffers), then classify them with the network of
    `model` (a `_target_` config). `class_names` (what each class means, when the data knows) travels in checkpoints
    for predict.py."""

    def __init__(
        self,
        input_shape: list[int],
        num_classes: int,
        model: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        in_features = math.prod(input_shape)
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.net = build_network(model, input_shape, num_classes)
        self.train_metrics = stage_metrics(num_classes)
        self.val_metrics = stage_metrics(num_classes)
        self.test_metrics = stage_metrics(num_classes)
        self.test_confusion = MulticlassConfusionMatrix(num_classes, validate_args=False)
        self.confusion: torch.Tensor | None = None  # the last test's confusion matrix (rows: true, columns: predicted)
        self.diverged_at: int | None = None  # the global step whose loss was NaN or infinite
        # on the device: whether a training loss was NaN or infinite, and the global step of the first one
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)
        self.register_buffer("nonfinite_step", torch.zeros((), dtype=torch.long), persistent=False)
        self.optimizer_skips = False  # whether this fit's optimizer skips a step on the device (on_train_start)
        # whether this fit keeps its state on the device to put it back after a non-finite step (on_train_start),
        # and that state: the net's parameters and buffers, then the optimizer's state tensors
        self.holds_state = False
        self.held: list[torch.Tensor] = []
        # per stage: (per-sample losses, predictions, labels) of the steps torchmetrics has not seen yet
        self._pending: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {
            stage: [] for stage in ("train", "val", "test")
        }

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(torch.as_tensor(mean).flatten())
        self.std.copy_(torch.as_tensor(std).flatten())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.flatten(1) - self.mean) / self.std)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        losses = F.cross_entropy(logits, labels, reduction="none")
        pending = self._pending[stage]
        pending.append((losses.detach(), logits.detach().argmax(dim=1), labels))
        if len(pending) >= METRIC_FLUSH_STEPS:
            self._flush(stage)
        return losses.mean()

    def _flush(self, stage: str) -> None:
        """Feed the pending steps to the stage's torchmetrics in one update each. The loss goes in per sample, so
        its epoch mean is over samples (MeanMetric drops weights under nan_strategy="disable")."""
        pending = self._pending[stage]
        if not pending:
            return
        losses, predictions, labels = (torch.cat(parts) for parts in zip(*pending, strict=True))
        pending.clear()
        metrics = getattr(self, f"{stage}_metrics")
        metrics["loss"].update(losses)
        metrics["acc"].update(predictions, labels)
        metrics["f1"].update(predictions, labels)
        if stage == "test":
            self.test_confusion.update(predictions, labels)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The metric states are in it only while they hold an epoch's partial sums (a signal's mid-epoch last.ckpt);
        at an epoch's end they are reset, and their empty tensors would only make every checkpoint slower to write."""
        with partial_metrics_kept((self.train_metrics, self.val_metrics, self.test_metrics)):
            return super().state_dict(*args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A mid-epoch checkpoint (SIGTERM) carries the pending steps beside the metric states, as plain containers of
        tensors outside the state_dict (which holds tensors only): the resumed run's flushes then fall on the same
        steps as an uninterrupted run's, so the epoch's float sums come out bit for bit the same. A non-finite loss
        not read yet goes with it too, so that the resumed run stops where the uninterrupted one does."""
        pending = {stage: list(steps) for stage, steps in self._pending.items() if steps}
        if pending:
            checkpoint[PENDING_KEY] = pending
        if self.diverged_at is None and bool(self.nonfinite):
            checkpoint[DIVERGENCE_KEY] = self.nonfinite_step.clone()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        device = self.mean.device
        saved = checkpoint.get(PENDING_KEY, {})
        self._pending = {
            stage: [tuple(part.to(device) for part in step) for step in saved.get(stage, [])] for stage in self._pending
        }
        if DIVERGENCE_KEY in checkpoint:
            self.nonfinite.fill_(True)
            self.nonfinite_step.copy_(checkpoint[DIVERGENCE_KEY])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        """The batch's mean loss. The first NaN or infinite one stops the run, its step not applied: the weights
        and the optimizer's state stay those of the last finite step. The check needs no host read per step where a
        read is a synchronisation: an optimizer that skips its step on the device (torch's fused ones, through the
        `found_inf` tensor they take from GradScaler) skips every later step too; on an accelerator, another one
        has its state kept on the device and put back after each step from the non-finite one on (`hold`,
        `put_back`). Either way the flag is read every DIVERGENCE_READ_EVERY batches and at the epoch's last one.
        Otherwise (another optimizer, on CPU) it is read at each step and the step not taken."""
        loss = self._step(batch, "train")
        if self.holds_state:
            self.hold()  # before this step's flag: what a non-finite loss here is put back to
        self.nonfinite_step.copy_(torch.where(self.nonfinite, self.nonfinite_step, self.global_step))
        self.nonfinite |= ~torch.isfinite(loss)
        if not (self.optimizer_skips or self.holds_state):
            if not self.read_divergence():
                return loss
            # no gradient left for this batch's optimizer step: with accumulate_grad_batches, the finite batches
            # before it in the window would otherwise still make it
            self.optimizers(use_pl_optimizer=False).zero_grad(set_to_none=True)
            return None
        if self.optimizer_skips:  # 1: the fused step changes neither weights nor state
            self.optimizers(use_pl_optimizer=False).found_inf = self.nonfinite.float()
        if (batch_idx + 1) % DIVERGENCE_READ_EVERY == 0 or batch_idx + 1 == self.trainer.num_training_batches:
            self.read_divergence()
        return loss

    def on_train_start(self) -> None:
        optimizer = self.optimizers(use_pl_optimizer=False)
        self.optimizer_skips = skips_on_device(optimizer, self.trainer.precision)
        self.holds_state = not self.optimizer_skips and not reads_every_step(self.device)
        self.held = []

    def state_tensors(self) -> list[torch.Tensor]:
        """What a step changes: the net's parameters and buffers, then the optimizer's state tensors (made at its
        first step, so the list grows once)."""
        state = self.optimizers(use_pl_optimizer=False).state
        parameters = list(self.net.parameters())
        optimizer_state = [v for p in parameters for v in state.get(p, {}).values() if isinstance(v, torch.Tensor)]
        return [*parameters, *self.net.buffers(), *optimizer_state]

    @torch.no_grad()
    def hold(self) -> None:
        """Keep the present state while every loss so far was finite, on the device: what put_back restores."""
        tensors = self.state_tensors()
        self.held += [tensor.detach().clone() for tensor in tensors[len(self.held) :]]
        for tensor, held in zip(tensors, self.held, strict=True):
            torch.where(self.nonfinite, held, tensor, out=held)

    @torch.no_grad()
    def put_back(self) -> None:
        """After a non-finite loss, the held state back in place of what the step made (no host read)."""
        for tensor, held in zip(self.state_tensors(), self.held, strict=False):  # state made by this step: as is
            torch.where(self.nonfinite, held, tensor, out=tensor)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable[[], Any] | None = None
    ) -> None:
        """Lightning's optimizer step, then, when this fit holds its state, the held state put back after a
        non-finite loss, before any callback sees the step."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.holds_state:
            self.put_back()

    def read_divergence(self) -> bool:
        """Read the divergence flag on the host; on the first non-finite loss, record its step and stop the run."""
        if self.diverged_at is None and bool(self.nonfinite):
            self.diverged_at = int(self.nonfinite_step)
            self.trainer.should_stop = True
        return self.diverged_at is not None

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Class probabilities of a batch of images (or of an (images, labels) pair: the labels are not read)."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=1)

    def _compute(self, stage: str) -> dict[str, torch.Tensor]:
        self._flush(stage)
        metrics = getattr(self, f"{stage}_metrics")
        values = {f"{stage}/{name}": value for name, value in metrics.compute().items()}
        metrics.reset()
        return values

    def on_validation_epoch_end(self) -> None:
        """Log the val metrics with the train metrics of the batches since the previous validation (the epoch, when
        validating once an epoch): one row of metrics.csv, before the checkpoint callbacks read it. The sanity check
        before training (trainer.num_sanity_val_steps) has no train metrics and logs no row."""
        values = self._compute("val")
        if self.trainer.sanity_checking:
            return
        if self.trainer.state.fn == TrainerFn.FITTING:
            values |= self._compute("train")
        self.log_dict(values)

    def train_metrics_since_validation(self) -> dict[str, torch.Tensor]:
        """Log and return the train metrics of the batches trained since the previous validation, then reset them
        (empty when there are none): what an epoch that ends without validation reports (descent.callbacks.
        EpochHistory asks at the epoch's end, before the checkpoint callbacks save)."""
        if not self._pending["train"] and not any(metric.update_count for metric in self.train_metrics.values()):
            return {}
        values = self._compute("train")
        self.log_dict(values)
        return values

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._compute("test"))
        self.confusion = self.test_confusion.compute().cpu()
        self.test_confusion.reset()

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.hparams.optimizer, self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": build_lr_scheduler(self.hparams.scheduler, optimizer)}

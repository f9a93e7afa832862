"""The DataModule: serves a split of a source as batches, in memory (descent.data.batches) or streamed from its
memory-mapped file when larger than `data.stream.in_memory_mb` (descent.data.streaming). It never decides the split
nor touches the model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from descent.config import ConfigError
from descent.data.batches import TensorBatches
from descent.data.sources import Source
from descent.data.splits import Split
from descent.data.streaming import StreamingBatches

log = logging.getLogger("descent")


def feature_stats(images: np.ndarray, indices: np.ndarray, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over `images[indices]`, one streaming pass in chunks of about 32 MB (never the
    whole array at once: the memory stays that of a chunk whatever the data's size).

    A feature constant on these samples (digits has blank border pixels) gets std 1, so it is centred, not blown up.
    """
    total = np.zeros(int(np.prod(images.shape[1:])), dtype=np.float64)
    squares = np.zeros_like(total)
    chunk = chunk or max(1, 2**22 // total.size)  # 4 Mi float64 values a chunk
    for start in range(0, len(indices), chunk):
        block = np.asarray(images[indices[start : start + chunk]], dtype=np.float64).reshape(-1, total.size)
        total += block.sum(axis=0)
        squares += np.square(block).sum(axis=0)
    mean = total / len(indices)
    std = np.sqrt(np.maximum(squares / len(indices) - np.square(mean), 0.0))
    std[std < 1e-6 * np.maximum(np.abs(mean), 1.0)] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


class ImageDataModule(pl.LightningDataModule):
    """Train/val/test batches of a source under a fixed split; train batches of `batch_size` (an int already).

    `stream` (`data.stream`: in_memory_mb, block_size, prefetch) streams a memory-mapped source whose split, as
    float32, is larger than `in_memory_mb`; without it, or below it, every part is loaded into memory once.
    `fractions` (part -> fraction in (0, 1)) are the `trainer.limit_*_batches` fractions the loaders apply themselves
    (`descent.data.batches.limited_bounds`). With the Trainer's `overfit_batches`, training batches are not shuffled.
    """

    def __init__(
        self,
        source: Source,
        split: Split,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        stream: Mapping[str, Any] | None = None,
        fractions: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.source, self.split = source, split
        self.fractions = dict(fractions or {})
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        size_mb = 4 * math.prod(source.image_shape) * sum(map(len, (split.train, split.val, split.test))) / 2**20
        self.stream = dict(stream) if stream else None
        self.streaming = (
            self.stream is not None and isinstance(source.images, np.memmap) and size_mb > self.stream["in_memory_mb"]
        )
        if self.streaming:
            log.info(
                "streaming batches from %s: %.0f MB as float32 > data.stream.in_memory_mb=%s",
                getattr(source.images, "filename", "the memory-mapped file"),
                size_mb,
                self.stream["in_memory_mb"],
            )

    def setup(self, stage: str | None = None) -> None:
        """Load each part once, on the device the model trains on (no host-to-device copy per batch)."""
        if self.streaming:
            return
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        for part in ("train", "val", "test"):
            if part in self.tensors:
                continue
            indices = getattr(self.split, part)
            images = torch.from_numpy(np.asarray(self.source.images[indices], dtype=np.float32))
            labels = torch.from_numpy(np.asarray(self.source.labels[indices], dtype=np.int64))
            self.tensors[part] = (images.to(device), labels.to(device))

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """In-memory parts already live on the training device (`setup`): their batches skip Lightning's generic
        move; streamed batches, read on the CPU, take it."""
        on_device = isinstance(batch, tuple) and all(isinstance(t, torch.Tensor) and t.device == device for t in batch)
        return batch if on_device else super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _batches(self, part: str, batch_size: int, shuffle: bool) -> TensorBatches | StreamingBatches:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        fraction = self.fractions.get(part)
        if not self.streaming:
            return TensorBatches(
                *self.tensors[part], batch_size, shuffle, self.seed, rank=rank, world_size=world_size, fraction=fraction
            )
        if world_size > 1:
            raise ConfigError(
                "trainer.devices",
                trainer.num_devices,
                "expected 1 with streamed data: streamed batches are not "
                "split between DDP processes (use one device, or a data.stream.in_memory_mb the data fits in)",
            )
        return StreamingBatches(
            self.source.images,
            self.source.labels,
            batch_size,
            shuffle,
            self.seed,
            indices=getattr(self.split, part),
            block_size=self.stream["block_size"],
            prefetch=self.stream["prefetch"],
            fraction=fraction,
        )

    def train_dataloader(self) -> TensorBatches | StreamingBatches:
        # trainer.overfit_batches trains on the same first batches every epoch; Lightning can only unshuffle a
        # DataLoader's own sampler, so ours stops shuffling here
        overfit = self.trainer is not None and self.trainer.overfit_batches > 0
        return self._batches("train", self.batch_size, shuffle=not overfit)

    def val_dataloader(self) -> TensorBatches | StreamingBatches:
        return self._batches("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> TensorBatches | StreamingBatches:
        return self._batches("test", self.eval_batch_size, shuffle=False)

"""The DataModule: serves a split of a source as batches. It never decides the split nor touches the model.

In-memory data is served as whole-batch tensor slices (one gather per epoch, then views), not per-sample
`__getitem__` plus collate, which costs ~3 us a sample here. The order of each epoch comes from (seed, epoch)
alone, so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytorch_lightning as pl
import torch

from descent.data.sources import Source
from descent.data.splits import Split


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of each batch; a last batch of a single sample is folded into the one before it,
    because batch norm cannot normalize one sample (and one sample is a noisy step anyway)."""
    starts = list(range(0, n, batch_size))
    bounds = [(s, min(s + batch_size, n)) for s in starts]
    if batch_size > 1 and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


class TensorBatches:
    """Batches of in-memory tensors, reshuffled each epoch from (seed, epoch).

    Lightning's fit loop calls `sampler.set_epoch(epoch)` on every loader before an epoch; this object is its own
    sampler so that the epoch number reaches the shuffle. Its state (epoch, batches served) travels in checkpoints,
    so a run resumed from a mid-epoch checkpoint (written on SIGTERM) trains on the batches it had not seen yet.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0
    ) -> None:
        self.images, self.labels = images, labels
        self.bounds = batch_bounds(len(labels), batch_size)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.sampler, self.batch_sampler = self, None  # the attributes Lightning looks for on a loader
        self.served = 0  # batches yielded in this epoch
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained) from a mid-epoch checkpoint

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.bounds)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if 0 < state["served"] < len(self):
            self._resume = (state["epoch"], state["served"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.images, self.labels
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(len(labels), generator=generator).to(labels.device)
            images, labels = images[order], labels[order]
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume, self.served = None, skip
        for start, end in self.bounds[skip:]:
            self.served += 1
            yield images[start:end], labels[start:end]


def feature_stats(images: np.ndarray, indices: np.ndarray, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over `images[indices]`, read in chunks (never the whole array at once).

    A feature constant on these samples (digits has blank border pixels) gets std 1, so it is centred, not blown up.
    """
    total = np.zeros(int(np.prod(images.shape[1:])), dtype=np.float64)
    squares = np.zeros_like(total)
    for start in range(0, len(indices), chunk):
        block = np.asarray(images[indices[start : start + chunk]], dtype=np.float64).reshape(-1, total.size)
        total += block.sum(axis=0)
        squares += np.square(block).sum(axis=0)
    mean = total / len(indices)
    std = np.sqrt(np.maximum(squares / len(indices) - np.square(mean), 0.0))
    std[std < 1e-6 * np.maximum(np.abs(mean), 1.0)] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


class ImageDataModule(pl.LightningDataModule):
    """Train/val/test batches of a source under a fixed split; train batches of `batch_size` (an int already)."""

    def __init__(self, source: Source, split: Split, batch_size: int, eval_batch_size: int, seed: int) -> None:
        super().__init__()
        self.source, self.split = source, split
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Load each part once, on the device the model trains on (no host-to-device copy per batch)."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        for part in ("train", "val", "test"):
            if part in self.tensors:
                continue
            indices = getattr(self.split, part)
            images = torch.from_numpy(np.asarray(self.source.images[indices], dtype=np.float32))
            labels = torch.from_numpy(np.asarray(self.source.labels[indices], dtype=np.int64))
            self.tensors[part] = (images.to(device), labels.to(device))

    def train_dataloader(self) -> TensorBatches:
        return TensorBatches(*self.tensors["train"], self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> TensorBatches:
        return TensorBatches(*self.tensors["val"], self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> TensorBatches:
        return TensorBatches(*self.tensors["test"], self.eval_batch_size, shuffle=False)

"""The DataModule: serves a split of a source as batches. It never decides the split nor touches the model, and
never reads a memory-mapped data set whole into memory.

In-memory data is served as whole-batch tensor slices (one gather per epoch, then views), not per-sample
`__getitem__` plus collate, which costs ~3 us a sample here. Data larger than `data.stream.in_memory_mb` is
streamed from its memory-mapped file by `StreamingBatches`. The order of each epoch comes from (seed, epoch)
alone, so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from descent.config import ConfigError
from descent.data.sources import Source
from descent.data.splits import Split
from descent.overhead import already_on

log = logging.getLogger("descent")


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of each batch; a last batch of a single sample is folded into the one before it,
    because batch norm cannot normalize one sample (and one sample is a noisy step anyway)."""
    starts = list(range(0, n, batch_size))
    bounds = [(s, min(s + batch_size, n)) for s in starts]
    if batch_size > 1 and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


class EpochLoader:
    """What Lightning needs of a loader that is not a DataLoader: a length, and `sampler.set_epoch(epoch)`, which
    its fit loop calls on every loader before an epoch; the loader is its own sampler, so the epoch reaches the
    shuffle.

    Its state (epoch, batches served) travels in checkpoints (Lightning saves a loader's `state_dict`), so a run
    resumed from a mid-epoch checkpoint (written on SIGTERM) trains on the batches it had not seen yet."""

    def __init__(self, bounds: list[tuple[int, int]], shuffle: bool, seed: int) -> None:
        self.bounds = bounds
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

    def _epoch_bounds(self) -> list[tuple[int, int]]:
        """The batches this epoch still has to serve: all of them, or those after a mid-epoch checkpoint's."""
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume, self.served = None, skip
        return self.bounds[skip:]


class TensorBatches(EpochLoader):
    """Batches of in-memory tensors, reshuffled each epoch from (seed, epoch)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.labels = images, labels
        self.rank, self.world_size = rank, world_size
        # DDP: this rank's share of every epoch, `rank::world_size`. Training ranks must make the same number of
        # steps, so they take len // world_size samples each (the few left over differ each epoch); val and test
        # shards cover every sample once, so synced metrics equal a single device's.
        share = len(labels) // world_size if shuffle else len(range(rank, len(labels), world_size))
        super().__init__(batch_bounds(share, batch_size), shuffle, seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.images, self.labels
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(len(labels), generator=generator).to(labels.device)
            images, labels = images[order], labels[order]
        if self.world_size > 1:
            images, labels = images[self.rank :: self.world_size], labels[self.rank :: self.world_size]
        for start, end in self._epoch_bounds():
            self.served += 1
            yield images[start:end], labels[start:end]


class StreamingBatches(EpochLoader):
    """Batches read from a memory-mapped array by a background thread, with reads that stay mostly sequential.

    The same interface as `TensorBatches`, over `images[indices]` and `labels[indices]` (`indices`: the split's
    sorted part, default all). A shuffled epoch visits contiguous blocks of `block_size` samples in a random order
    and the samples of each block in a random order; each batch's indices are sorted before the read, so a batch
    touches one region of the file, in file order. A thread reads and converts `prefetch` batches ahead of the
    model (the reads and numpy's conversions release the GIL), so training does not wait on the disk.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        *,
        indices: np.ndarray | None = None,
        block_size: int = 65_536,
        prefetch: int = 8,
    ) -> None:
        self.images, self.labels = images, labels
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
        super().__init__(batch_bounds(len(self.indices), batch_size), shuffle, seed)
        self.block_size, self.prefetch = block_size, prefetch

    def order(self) -> np.ndarray:
        """The epoch's sample order: blocks shuffled, then samples within each block."""
        if not self.shuffle:
            return self.indices
        rng = np.random.default_rng([self.seed, self.epoch])
        blocks = [
            self.indices[start : start + self.block_size] for start in range(0, len(self.indices), self.block_size)
        ]
        return np.concatenate([rng.permutation(blocks[b]) for b in rng.permutation(len(blocks))])

    def read(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        batch = np.sort(batch)
        images = torch.from_numpy(np.asarray(self.images[batch], dtype=np.float32))
        return images, torch.from_numpy(np.asarray(self.labels[batch], dtype=np.int64))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, bounds = self.order(), self._epoch_bounds()
        ready: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item: Any) -> None:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def load() -> None:
            try:
                for start, end in bounds:
                    if stop.is_set():
                        return
                    put(self.read(order[start:end]))
            except Exception as error:  # raised again in the consumer, which would otherwise wait forever
                put(error)

        thread = threading.Thread(target=load, name="descent-prefetch", daemon=True)
        thread.start()
        try:
            for _ in bounds:
                item = ready.get()
                if isinstance(item, Exception):
                    raise item
                self.served += 1
                yield item
        finally:  # also when the loop stops early (sanity check, early stopping, divergence)
            stop.set()
            thread.join()


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
    """

    def __init__(
        self,
        source: Source,
        split: Split,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        stream: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.source, self.split = source, split
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
                getattr(source.images, "filename", "the memory-mapped file"), size_mb, self.stream["in_memory_mb"],
            )  # fmt: skip

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
        return batch if already_on(batch, device) else super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _batches(self, part: str, batch_size: int, shuffle: bool) -> TensorBatches | StreamingBatches:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if not self.streaming:
            return TensorBatches(*self.tensors[part], batch_size, shuffle, self.seed, rank=rank, world_size=world_size)
        if world_size > 1:
            raise ConfigError(
                "trainer.devices", trainer.num_devices, "expected 1 with streamed data: streamed batches are not "
                "split between DDP processes (use one device, or a data.stream.in_memory_mb the data fits in)",
            )  # fmt: skip
        return StreamingBatches(
            self.source.images, self.source.labels, batch_size, shuffle, self.seed, indices=getattr(self.split, part),
            block_size=self.stream["block_size"], prefetch=self.stream["prefetch"],
        )  # fmt: skip

    def train_dataloader(self) -> TensorBatches | StreamingBatches:
        return self._batches("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> TensorBatches | StreamingBatches:
        return self._batches("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> TensorBatches | StreamingBatches:
        return self._batches("test", self.eval_batch_size, shuffle=False)

"""Streaming: batches read from a memory-mapped array larger than memory, by a background thread, with reads that
stay mostly sequential. The course's case: millions of images that do not fit in memory are read as the model needs
them. It never reads the whole array into memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from descent.data.batches import EpochLoader, batch_bounds


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
        fraction: float | None = None,
    ) -> None:
        self.images, self.labels = images, labels
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
        super().__init__(batch_bounds(len(self.indices), batch_size), shuffle, seed, fraction)
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

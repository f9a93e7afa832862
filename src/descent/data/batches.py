"""In-memory batches: whole-batch tensor slices of a split's part, reshuffled each epoch from (seed, epoch) alone,
so that a resumed run sees the batches an uninterrupted one would. `EpochLoader` is what every loader of ours is
to Lightning: a length, an epoch, and a position that travels in checkpoints.

Served as slices of one gather per epoch, not per-sample `__getitem__` plus collate (a per-sample cost on every
sample).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import SequentialSampler


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of each batch; a last batch of a single sample is folded into the one before it,
    because batch norm cannot normalize one sample (and one sample is a noisy step anyway)."""
    starts = list(range(0, n, batch_size))
    bounds = [(s, min(s + batch_size, n)) for s in starts]
    if batch_size > 1 and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def limited_bounds(bounds: list[tuple[int, int]], fraction: float | None) -> list[tuple[int, int]]:
    """The batches a `trainer.limit_*_batches` (or `overfit_batches`) fraction keeps: the first int(fraction x
    batches), as Lightning counts them; where that is 0 (a fraction of a single batch, such as digits' one validation
    batch), one batch of the first int(fraction x samples) samples (at least one), where Lightning would refuse."""
    if fraction is None or fraction >= 1 or not bounds:
        return bounds
    kept = int(fraction * len(bounds))
    if kept >= 1:
        return bounds[:kept]
    start, end = bounds[0][0], bounds[-1][1]
    return [(start, start + max(1, int(fraction * (end - start))))]


class EpochSampler(SequentialSampler):
    """The sampler Lightning sees on an unshuffled loader: sequential (Lightning's `overfit_batches` looks for that
    before it would try to turn shuffling off), and passing the epoch that Lightning sets on to the loader."""

    def __init__(self, loader: EpochLoader) -> None:
        super().__init__(range(len(loader)))
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of an epoch's n training samples: a permutation drawn from (seed, epoch) alone."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class EpochLoader:
    """What Lightning needs of a loader that is not a DataLoader: a length, and `sampler.set_epoch(epoch)`, which
    its fit loop calls on every loader before an epoch; a shuffled loader is its own sampler, so the epoch reaches
    the shuffle. `fraction` keeps the batches of `limited_bounds` (Lightning is then given 1.0 for that part).

    Its state (epoch, batches served) travels in checkpoints (Lightning saves a loader's `state_dict`), so a run
    resumed from a mid-epoch checkpoint (written on SIGTERM) trains on the batches it had not seen yet."""

    def __init__(self, bounds: list[tuple[int, int]], shuffle: bool, seed: int, fraction: float | None = None) -> None:
        self.bounds = limited_bounds(bounds, fraction)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        # the attributes Lightning looks for on a loader
        self.sampler: EpochLoader | EpochSampler = self if shuffle else EpochSampler(self)
        self.batch_sampler = None
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
        fraction: float | None = None,
    ) -> None:
        self.images, self.labels = images, labels
        self.rank, self.world_size = rank, world_size
        # DDP: this rank's share of every epoch, `rank::world_size`. Training ranks must make the same number of
        # steps, so they take len // world_size samples each (the few left over differ each epoch); val and test
        # shards cover every sample once, so synced metrics equal a single device's.
        share = len(labels) // world_size if shuffle else len(range(rank, len(labels), world_size))
        super().__init__(batch_bounds(share, batch_size), shuffle, seed, fraction)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.images, self.labels
        if self.shuffle:
            order = epoch_order(len(labels), self.seed, self.epoch).to(labels.device)
            images, labels = images[order], labels[order]
        if self.world_size > 1:
            images, labels = images[self.rank :: self.world_size], labels[self.rank :: self.world_size]
        for start, end in self._epoch_bounds():
            self.served += 1
            yield images[start:end], labels[start:end]


class ReplicateBatches(EpochLoader):
    """The training batches of k replicates at once: at each step a (k, B, ...) stack whose [i] is the batch that
    TensorBatches of seed `seeds[i]` serves at that step (the same order, the same bounds).

    Each step gathers its k batches from the images (never k shuffled copies of the whole training split)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seeds: list[int]) -> None:
        self.images, self.labels, self.seeds = images, labels, list(seeds)
        super().__init__(batch_bounds(len(labels), batch_size), shuffle=True, seed=self.seeds[0])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, k = len(self.labels), len(self.seeds)
        orders = torch.stack([epoch_order(n, seed, self.epoch) for seed in self.seeds]).to(self.labels.device)
        for start, end in self._epoch_bounds():
            self.served += 1
            index = orders[:, start:end].reshape(-1)
            images = self.images.index_select(0, index).view(k, end - start, *self.images.shape[1:])
            yield images, self.labels.index_select(0, index).view(k, end - start)

import threading

import numpy as np
import pytest
import torch

from descent.data.batches import TensorBatches, batch_bounds
from descent.data.datamodule import ImageDataModule, feature_stats
from descent.data.sources import Source
from descent.data.splits import Split
from descent.data.streaming import StreamingBatches


def test_a_last_batch_of_one_sample_is_folded_into_the_previous_one():
    assert batch_bounds(65, 32) == [(0, 32), (32, 65)]
    assert batch_bounds(64, 32) == [(0, 32), (32, 64)]
    assert batch_bounds(70, 32) == [(0, 32), (32, 64), (64, 70)]
    assert batch_bounds(10, 10) == [(0, 10)]
    assert len(batch_bounds(7, 1)) == 7  # stochastic gradient descent: every sample is its own step


def test_every_sample_is_served_once_per_epoch_in_a_new_order_each_epoch():
    images, labels = torch.arange(100.0).view(100, 1), torch.arange(100)
    batches = TensorBatches(images, labels, 16, shuffle=True, seed=1)
    batches.set_epoch(0)
    first = torch.cat([y for _, y in batches])
    batches.set_epoch(1)
    second = torch.cat([y for _, y in batches])
    assert sorted(first.tolist()) == list(range(100))
    assert not torch.equal(first, second)
    batches.set_epoch(0)
    assert torch.equal(torch.cat([y for _, y in batches]), first)  # the order is a function of (seed, epoch)


@pytest.mark.parametrize("overfit_batches, same", [(1, True), (0, False)])
def test_overfit_batches_trains_on_the_same_first_batch_every_epoch(overfit_batches, same):
    import pytorch_lightning as pl

    source = Source("counting", np.arange(200, dtype=np.float32).reshape(200, 1, 1), np.arange(200) % 10)
    datamodule = ImageDataModule(source, Split(np.arange(100), np.arange(100, 150), np.arange(150, 200)), 8, 64, 0)
    datamodule.trainer = pl.Trainer(overfit_batches=overfit_batches, logger=False, enable_checkpointing=False)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    firsts = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        firsts.append(next(iter(loader))[1])
    assert all(torch.equal(first, firsts[0]) for first in firsts) == same


def test_images_and_labels_stay_paired():
    images, labels = torch.arange(50.0).view(50, 1), torch.arange(50)
    for x, y in TensorBatches(images, labels, 8, shuffle=True, seed=3):
        assert torch.equal(x.view(-1).long(), y)


def test_constant_features_are_centred_not_blown_up():
    images = np.random.default_rng(0).normal(5.0, 2.0, size=(500, 2, 2)).astype(np.float32)
    images[:, 0, 0] = 3.0
    mean, std = feature_stats(images, np.arange(500), chunk=64)
    assert std[0] == 1.0 and mean[0] == 3.0
    assert np.allclose(mean[1:], images.reshape(500, -1)[:, 1:].mean(0), atol=1e-4)
    assert np.allclose(std[1:], images.reshape(500, -1)[:, 1:].std(0), atol=1e-3)


# --- streaming from a memory-mapped file ---


@pytest.fixture
def mapped(tmp_path):
    """1,000 images whose single pixel is their own index, memory-mapped, and labels = index % 10."""
    np.save(tmp_path / "images.npy", np.arange(1000, dtype=np.int32).reshape(1000, 1, 1))
    return np.load(tmp_path / "images.npy", mmap_mode="r"), np.arange(1000) % 10


def served(batches):
    return [x.view(-1).long() for x, _ in batches]


def test_streaming_serves_each_sample_of_its_part_once_per_epoch_in_a_new_order(mapped):
    images, labels = mapped
    part = np.sort(np.random.default_rng(0).choice(1000, 600, replace=False))
    batches = StreamingBatches(images, labels, 64, shuffle=True, seed=1, indices=part, block_size=100)
    first = torch.cat(served(batches))
    batches.set_epoch(1)
    second = torch.cat(served(batches))
    assert sorted(first.tolist()) == part.tolist() and not torch.equal(first, second)
    batches.set_epoch(0)
    assert torch.equal(torch.cat(served(batches)), first)  # the order is a function of (seed, epoch)
    assert len(batches) == len(batch_bounds(600, 64))


def test_streamed_batches_read_sorted_indices_from_one_or_two_blocks(mapped):
    images, labels = mapped
    batches = StreamingBatches(images, labels, 50, shuffle=True, seed=0, block_size=200)
    for batch in served(batches):
        assert torch.equal(batch, batch.sort().values)  # one pass through the file, in file order
        assert len(set((batch // 200).tolist())) <= 2  # a batch stays within its block (or straddles two)


def test_streamed_images_and_labels_stay_paired(mapped):
    images, labels = mapped
    for x, y in StreamingBatches(images, labels, 32, shuffle=True, seed=3, block_size=128, prefetch=2):
        assert x.dtype == torch.float32 and torch.equal(x.view(-1).long() % 10, y)


def test_stopping_early_stops_the_reader_thread(mapped):
    images, labels = mapped
    batches = iter(StreamingBatches(images, labels, 10, shuffle=False, prefetch=2))
    next(batches)
    batches.close()
    assert not any(thread.name == "descent-prefetch" for thread in threading.enumerate())


def test_a_read_error_reaches_the_training_loop(mapped):
    images, labels = mapped
    batches = StreamingBatches(images, labels[:500], 100, shuffle=False, indices=np.arange(1000))  # 500 labels
    with pytest.raises(IndexError):
        served(batches)


def test_feature_stats_of_a_memory_mapped_file_match_numpy(mapped):
    images, _ = mapped
    mean, std = feature_stats(images, np.arange(0, 1000, 2))
    assert mean[0] == pytest.approx(499.0) and std[0] == pytest.approx(np.arange(0, 1000, 2).std(), rel=1e-5)

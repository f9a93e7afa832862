import numpy as np
import torch

from descent.data.datamodule import TensorBatches, batch_bounds, feature_stats


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

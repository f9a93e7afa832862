import numpy as np
import pytest

from descent.data.sources import load_digits
from descent.data.splits import Split, train_val_test


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_digits().labels


def test_split_is_disjoint_and_complete(labels):
    split = train_val_test(labels, (0.6, 0.2, 0.2), seed=0)
    together = np.concatenate([split.train, split.val, split.test])
    assert len(together) == len(labels)
    assert set(together) == set(range(len(labels)))


def test_split_fractions_are_60_20_20(labels):
    split = train_val_test(labels, (0.6, 0.2, 0.2), seed=0)
    assert abs(len(split.train) / len(labels) - 0.6) < 0.01
    assert abs(len(split.val) / len(labels) - 0.2) < 0.01
    assert abs(len(split.test) / len(labels) - 0.2) < 0.01


def test_every_class_keeps_its_share_within_one_sample(labels):
    split = train_val_test(labels, (0.6, 0.2, 0.2), seed=3)
    for part, fraction in ((split.train, 0.6), (split.val, 0.2), (split.test, 0.2)):
        for label in np.unique(labels):
            expected = fraction * np.sum(labels == label)
            assert abs(np.sum(labels[part] == label) - expected) <= 1.0 + 1e-9


def test_same_seed_same_split_and_other_seed_other_split(labels):
    first, again, other = (train_val_test(labels, (0.6, 0.2, 0.2), seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(getattr(first, p), getattr(again, p)) for p in ("train", "val", "test"))
    assert not np.array_equal(first.test, other.test)


def test_split_round_trips_through_npz(tmp_path, labels):
    split = train_val_test(labels, (0.6, 0.2, 0.2), seed=1)
    split.save(tmp_path / "split.npz")
    loaded = Split.load(tmp_path / "split.npz")
    assert np.array_equal(loaded.test, split.test) and loaded.train.dtype.kind == "i"

import numpy as np
import pytest
from data_files import labelled_people

from descent.config import ConfigError
from descent.data.sources import load_digits
from descent.data.splits import Split, make_splits, strata, train_val_test


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


# --- stratification by attributes, groups, k folds (a data set with label, sex and subject columns) ---

PARTS = ("train", "val", "test")


@pytest.fixture(scope="module")
def people():
    return labelled_people()


def columns_of(table, names):
    return {name: table[name].to_numpy() for name in names}


def cell_shares(table, split):
    """{(label, sex): (train share, val share, test share)} of each label x sex cell."""
    shares = {}
    for (label, sex), cell in table.groupby(["label", "sex"]).groups.items():
        cell = np.asarray(cell)
        shares[label, sex] = tuple(np.isin(cell, getattr(split, part)).mean() for part in PARTS)
    return shares


def test_label_x_sex_cells_keep_60_20_20_within_2_points(people):
    (split,) = make_splits(len(people), columns_of(people, ["label", "sex"]), (0.6, 0.2, 0.2), seed=0)
    for cell, shares in cell_shares(people, split).items():
        assert np.allclose(shares, (0.6, 0.2, 0.2), atol=0.02), (cell, shares)


def test_label_x_sex_cells_keep_60_20_20_within_2_points_in_every_fold(people):
    splits = make_splits(len(people), columns_of(people, ["label", "sex"]), (0.6, 0.2, 0.2), seed=0, folds=5)
    for split in splits:
        for cell, shares in cell_shares(people, split).items():
            assert np.allclose(shares, (0.6, 0.2, 0.2), atol=0.02), (cell, shares)


def test_every_sample_is_tested_exactly_once_across_folds(labels):
    splits = make_splits(len(labels), {"label": labels}, (0.6, 0.2, 0.2), seed=0, folds=5)
    tested = np.concatenate([split.test for split in splits])
    assert len(tested) == len(labels) and set(tested) == set(range(len(labels)))
    for split in splits:
        together = np.concatenate([split.train, split.val, split.test])
        assert len(together) == len(labels) == len(set(together))
        assert abs(len(split.val) / (len(split.train) + len(split.val)) - 0.25) < 0.01  # so each fold is 60/20/20


def test_a_subject_is_never_in_two_splits(people):
    subjects = people["subject"].to_numpy()
    (split,) = make_splits(len(people), columns_of(people, ["label", "sex"]), (0.6, 0.2, 0.2), 0, groups=subjects)
    sets = [set(subjects[getattr(split, part)]) for part in PARTS]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(map(len, (split.train, split.val, split.test))) == len(people)
    assert abs(len(split.test) / len(people) - 0.2) < 0.03  # as close as groups of 10 samples allow


def test_a_subject_is_never_in_two_test_folds_nor_in_two_parts_of_a_fold(people):
    subjects = people["subject"].to_numpy()
    splits = make_splits(len(people), {"label": people["label"].to_numpy()}, (0.6, 0.2, 0.2), 0, 5, subjects)
    tested = [set(subjects[split.test]) for split in splits]
    assert sum(map(len, tested)) == len(set(subjects))  # each subject in exactly one test fold
    for split in splits:
        sets = [set(subjects[getattr(split, part)]) for part in PARTS]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


def test_strata_too_small_are_pooled_within_their_label_never_across_labels():
    label = np.repeat([0, 1], 50)
    site = np.array(["a"] * 47 + ["rare"] * 3 + ["a"] * 50)  # label 0 x rare: 3 samples, fewer than 5
    codes = strata({"label": label, "site": site}, needed=5)
    assert len(set(codes[:50])) == 1 and set(codes[:50]).isdisjoint(codes[50:])
    (split,) = make_splits(100, {"label": label, "site": site}, (0.6, 0.2, 0.2), seed=0)
    assert np.sum(label[split.test] == 0) == 10 and np.sum(label[split.test] == 1) == 10


def test_small_strata_of_one_label_are_pooled_together_when_that_is_enough():
    label = np.zeros(60, dtype=int)
    site = np.array(["a"] * 50 + ["b", "c", "d", "e", "f"] * 2)  # five strata of 2, pooled: 10 >= 5
    codes = strata({"label": label, "site": site}, needed=5)
    assert len(set(codes[:50])) == 1 and len(set(codes[50:])) == 1 and codes[0] != codes[50]


def test_a_label_too_small_for_the_folds_is_refused_naming_it_and_its_count():
    labels = np.array([0] * 40 + [1] * 40 + [2] * 3)
    with pytest.raises(ConfigError, match=r"cv\.folds=5 .*the stratum label=2 has 3 samples"):
        make_splits(len(labels), {"label": labels}, (0.6, 0.2, 0.2), seed=0, folds=5)
    with pytest.raises(ConfigError, match=r"data\.stratify_by=\['label'\] .*label=2 has 3 samples"):
        make_splits(len(labels), {"label": labels}, (0.6, 0.2, 0.2), seed=0)


def test_too_few_groups_are_refused_naming_the_key():
    labels = np.tile([0, 1], 50)
    groups = np.repeat(["a", "b", "c"], [34, 33, 33])
    with pytest.raises(ConfigError, match=r"cv\.folds=5 .*data\.group_by has 3 groups"):
        make_splits(100, {"label": labels}, (0.6, 0.2, 0.2), seed=0, folds=5, groups=groups)
    with pytest.raises(ConfigError, match=r"data\.group_by has 3 groups, and this split needs at least 5"):
        make_splits(100, {"label": labels}, (0.6, 0.2, 0.2), seed=0, groups=groups)

"""Cross-validation, stratification and groups, and the data sources, through the real train.py."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ENV, compose_train, results_of, run_script
from data_files import labelled_people, write_arrays, write_png_folder

from descent.config import ConfigError, validate

ONE_EPOCH = ["trainer.max_epochs=1", "callbacks.progress_bar=null", "model.hidden_dims=[16]"]
LEARN = [
    "trainer.max_epochs=2",
    "optimizer.lr=0.01",
    "data.batch_size=16",
    "callbacks.progress_bar=null",
    "model.hidden_dims=[16]",
]


def arrays_overrides(paths):
    return [
        "data=arrays",
        f"data.images={paths['images']}",
        f"data.labels={paths['labels']}",
        f"data.metadata={paths['metadata']}",
    ]


@pytest.fixture
def people_files(tmp_path):
    return write_arrays(tmp_path / "people", labelled_people(n_subjects=60))


@pytest.mark.slow
def test_five_fold_cv_tests_every_sample_once_and_reports_mean_and_std(train):
    process, run_dir = train("cv.folds=5", "trainer.max_epochs=1")
    assert process.returncode == 0, process.stderr
    results = results_of(run_dir)
    assert results["status"] == "ok" and len(results["folds"]) == 5
    tested = []
    for fold in range(5):
        fold_dir = run_dir / f"fold_{fold}"
        for name in ("results.json", "metrics.csv", "split.npz", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
            assert (fold_dir / name).is_file(), name
        with np.load(fold_dir / "split.npz") as split:
            tested.append(split["test"])
            assert len(split["train"]) + len(split["val"]) + len(split["test"]) == 1797
            assert abs(len(split["val"]) / 1797 - 0.2) < 0.01  # each fold is 60/20/20
        assert results_of(fold_dir)["metrics"] == results["folds"][fold]["metrics"]
    tested = np.concatenate(tested)
    assert sorted(tested) == list(range(1797)) and results["every_sample_tested_once"] is True
    accuracies = [fold["metrics"]["test/acc"] for fold in results["folds"]]
    assert results["mean"]["test/acc"] == pytest.approx(np.mean(accuracies))
    assert results["std"]["test/acc"] == pytest.approx(np.std(accuracies, ddof=1))
    assert set(results["mean"]) == set(results["std"]) == set(results["folds"][0]["metrics"])
    # the run counts its longest fold's epochs and steps, as a single run would (a sweep's table shows them)
    assert results["epochs"] == 1 and results["steps"] == max(fold["steps"] for fold in results["folds"])
    assert "fold 4" in process.stdout and "mean" in process.stdout and "std" in process.stdout


@pytest.mark.slow
def test_folds_run_as_sweep_jobs_and_gathered_equal_the_folds_of_one_cv_run(train, tmp_path):
    process, run_dir = train("cv.folds=3", *ONE_EPOCH)
    assert process.returncode == 0, process.stderr
    sweep = tmp_path / "sweep"
    jobs = run_script("train.py", "-m", "cv.folds=3", "cv.fold=0,1,2", *ONE_EPOCH, f"hydra.sweep.dir={sweep}")
    assert jobs.returncode == 0, jobs.stderr
    assert sorted(p.name for p in sweep.glob("*/fold_*")) == ["fold_0", "fold_1", "fold_2"]
    gathered = subprocess.run(
        [sys.executable, "-m", "descent.crossval", str(sweep)], env=ENV, capture_output=True, text=True
    )
    assert gathered.returncode == 0, gathered.stderr
    (setting,) = json.loads((sweep / "crossval.json").read_text())["settings"]
    expected = results_of(run_dir)
    assert [fold["fold"] for fold in setting["folds"]] == [0, 1, 2]
    assert setting["mean"]["test/acc"] == pytest.approx(expected["mean"]["test/acc"])
    assert "fold 2" in gathered.stdout and "mean" in gathered.stdout


@pytest.mark.slow
def test_stratified_group_cv_on_the_users_arrays_keeps_subjects_apart(train, people_files):
    process, run_dir = train(
        *arrays_overrides(people_files), "data.stratify_by=[label,sex]", "data.group_by=subject", "cv.folds=3", *LEARN
    )
    assert process.returncode == 0, process.stderr
    subjects = np.array(labelled_people(n_subjects=60)["subject"])
    tested = []
    for fold in range(3):
        with np.load(run_dir / f"fold_{fold}" / "split.npz") as split:
            parts = [set(subjects[split[part]]) for part in ("train", "val", "test")]
            assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
            tested.append(parts[2])
    assert sum(map(len, tested)) == len(set().union(*tested)) == 60
    assert results_of(run_dir)["mean"]["test/acc"] > 0.5  # the label is in the pixels; chance is ~0.4


def test_a_folder_of_pngs_trains(train, tmp_path):
    root = write_png_folder(tmp_path / "pngs", per_class=15)
    process, run_dir = train(
        "data=folder",
        f"data.root={root}",
        f"data.cache_dir={tmp_path}/cache",
        "data.image_size=6",
        "data.batch_size=6",
        *ONE_EPOCH,
    )
    assert process.returncode == 0, process.stderr
    results = results_of(run_dir)
    assert results["status"] == "ok" and (results["n_train"], results["n_val"], results["n_test"]) == (18, 6, 6)
    assert list(tmp_path.glob("cache/folder-*/manifest.json"))


def test_synthetic_data_is_learnt_when_streamed(train, tmp_path):
    process, run_dir = train(
        "data=synthetic",
        "data.n_samples=3000",
        "data.image_size=8",
        f"data.dir={tmp_path}/syn",
        "data.stream.in_memory_mb=0",
        *LEARN,
    )
    assert process.returncode == 0, process.stderr
    assert "streaming batches from" in process.stderr + process.stdout
    assert results_of(run_dir)["metrics"]["test/acc"] > 0.5  # chance is 0.1


def corrupt_npy(paths):
    paths["images"].write_bytes(b"\x93NUMPY garbage")


def short_labels(paths):
    np.save(paths["labels"], np.zeros(10, dtype=np.int64))


def float_labels(paths):
    np.save(paths["labels"], np.load(paths["labels"]).astype(np.float64))


def a_label_of_three(paths):
    labels = np.load(paths["labels"])
    labels[:3] = 3
    np.save(paths["labels"], labels)


@pytest.mark.parametrize(
    ("damage", "overrides", "message"),
    [
        (lambda p: p["images"].unlink(), [], "data.images="),
        (corrupt_npy, [], "corrupt"),
        (short_labels, [], "it holds 10 labels but data.images holds 600 images"),
        (float_labels, [], "expected a 1-D array of integer class labels, got float64"),
        (None, ["data.stratify_by=[label,age]"], "'age' is not allowed: expected one of the columns"),
        (a_label_of_three, ["cv.folds=5"], "cv.folds=5 is not allowed: the stratum label=3 has 3 samples"),
        (None, ["data.group_by=subject", "cv.folds=5", "data.metadata=SUBJECTS3"], "data.group_by has 3 groups"),
    ],
    ids=[
        "missing file",
        "corrupt npy",
        "length mismatch",
        "float labels",
        "unknown column",
        "small stratum",
        "too few groups",
    ],
)
def test_bad_data_stops_with_one_message_naming_the_file_or_key(train, people_files, damage, overrides, message):
    if damage:
        damage(people_files)
    subjects3 = people_files["metadata"].with_name("three.csv")
    subjects3.write_text("subject\n" + "\n".join(f"s{i % 3}" for i in range(600)) + "\n")
    overrides = [o.replace("SUBJECTS3", str(subjects3)) for o in overrides]
    process, run_dir = train(*arrays_overrides(people_files), *overrides, *ONE_EPOCH)
    output = process.stdout + process.stderr
    assert process.returncode == 2, output
    assert message in output and "Traceback" not in output
    assert results_of(run_dir)["status"] == "failed"


def test_a_corrupt_image_stops_the_run_naming_its_path(train, tmp_path):
    root = write_png_folder(tmp_path / "pngs")
    (root / "dark" / "broken.png").write_bytes(b"not a png")
    process, _ = train("data=folder", f"data.root={root}", f"data.cache_dir={tmp_path}/cache", *ONE_EPOCH)
    output = process.stdout + process.stderr
    assert process.returncode == 2 and "Traceback" not in output
    assert f"cannot read the image {root}/dark/broken.png" in output


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["cv.folds=1"], "cv.folds=1 is not allowed: expected 0 (off) or an int >= 2"),
        (["cv.folds=3", "cv.fold=3"], "cv.fold=3 is not allowed: expected null (every fold) or a fold number"),
        (["cv.fold=0"], "cv.fold=0 is not allowed"),
        (["cv.folds=3", "ckpt_path=last.ckpt"], "a checkpoint resumes one fold: add cv.fold=i"),
    ],
)
def test_bad_cv_keys_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_train(*overrides))

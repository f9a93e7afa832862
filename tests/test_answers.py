"""A sweep's answer: one split for every seed, settings (not jobs) with their mean and 95% interval, paired tests
against the best, ties said as ties, and the time to reach the target."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, results_of, run_script
from scipy import stats
from sklearn.datasets import load_digits

from descent.callbacks import EpochHistory
from descent.data.splits import make_splits
from descent.summary import settings_rows

ONE_EPOCH = ["trainer.max_epochs=1", "callbacks.progress_bar=null"]


def sweep(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_script("train.py", "-m", *FAST, f"hydra.sweep.dir={sweep_dir}", *overrides)


def settings_csv(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "settings.csv") as file:
        return list(csv.DictReader(file))


def job(sweep_dir: Path, name: str, overrides: list[str], results: dict) -> Path:
    """A finished job folder as a sweep leaves it."""
    folder = sweep_dir / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"status": "ok", "overrides": overrides, **results}))
    return folder


def seeded(seed: int, val_acc: float, seconds: float | None = 1.0) -> dict:
    return {
        "seed": seed,
        "metrics": {"val/acc": val_acc, "test/acc": 1 - val_acc, "test/loss": 0.1},
        "to_target": {"val_acc": 0.95, "epoch": 1, "step": 10, "seconds": seconds},
    }


def test_the_folds_follow_the_split_seed_alone():
    labels = np.repeat(np.arange(5), 40)
    columns = {"label": labels}
    first = make_splits(len(labels), columns, (0.6, 0.2, 0.2), 42, folds=3)
    again = make_splits(len(labels), columns, (0.6, 0.2, 0.2), 42, folds=3)
    other = make_splits(len(labels), columns, (0.6, 0.2, 0.2), 7, folds=3)
    assert all(
        np.array_equal(a.test, b.test) and np.array_equal(a.val, b.val) for a, b in zip(first, again, strict=True)
    )
    assert not all(np.array_equal(a.test, b.test) for a, b in zip(first, other, strict=True))


def test_settings_group_a_sweeps_jobs_over_seeds_replicates_and_folds(tmp_path):
    for index, (optimizer, seed, acc) in enumerate(
        [("adam", 1, 0.95), ("adam", 2, 0.96), ("sgd", 1, 0.80), ("sgd", 2, 0.81)]
    ):
        job(tmp_path, str(index), [f"optimizer={optimizer}", f"seed={seed}"], seeded(seed, acc))
    replicates = [
        {**seeded(seed, 0.90 + seed / 100), "status": "ok", "dir": f"replicate_{i}"} for i, seed in enumerate((1, 2))
    ]
    job(tmp_path, "4", ["optimizer=rmsprop"], {"replicates": replicates})
    job(tmp_path, "5", ["optimizer=momentum", "seed=1"], {"status": "failed", "error": "boom"})
    rows = {row["label"]: row for row in settings_rows(tmp_path, "val/acc", 0.05)}
    assert set(rows) == {"adam", "sgd", "rmsprop"}  # a failed job is no replicate; the seed is no setting
    assert rows["adam"]["n"] == rows["sgd"]["n"] == rows["rmsprop"]["n"] == 2
    assert rows["adam"]["verdict"] == "best" and rows["adam"]["optimizer"] == "adam"
    assert rows["sgd"]["paired_by"] == rows["rmsprop"]["paired_by"] == "seed"  # seeds 1 and 2 on each side
    assert rows["adam"]["val/acc_mean"] == pytest.approx(0.955)
    low, high = stats.t.interval(0.95, 1, loc=0.955, scale=np.std([0.95, 0.96], ddof=1) / np.sqrt(2))
    assert (rows["adam"]["val/acc_ci_low"], rows["adam"]["val/acc_ci_high"]) == pytest.approx((low, high))


def test_the_folds_of_a_cv_job_are_replicates_paired_by_fold(tmp_path):
    for index, (optimizer, shift) in enumerate([("adam", 0.0), ("sgd", -0.1)]):
        folds = [
            {
                "fold": f,
                "status": "ok",
                "n_train": 600,
                "n_test": 300,
                "dir": f"fold_{f}",
                "metrics": {"val/acc": 0.9 + shift + f / 100},
            }
            for f in range(3)
        ]
        job(tmp_path, str(index), [f"optimizer={optimizer}", "cv.folds=3"], {"folds": folds})
    rows = {row["label"]: row for row in settings_rows(tmp_path, "val/acc", 0.05)}
    assert rows["adam"]["n"] == rows["sgd"]["n"] == 3 and rows["sgd"]["paired_by"] == "fold"
    assert rows["sgd"]["verdict"] == "worse" and rows["sgd"]["p_value"] == 0.0  # the same difference on every fold


def test_to_target_is_the_first_validation_at_or_above_it_and_null_when_never(tmp_path):
    history = EpochHistory(tmp_path / "metrics.csv")
    history.rows = [
        {"epoch": 0, "step": 34, "time_s": 0.5, "val/acc": 0.90},
        {"epoch": 1, "step": 68, "time_s": 1.0, "val/acc": 0.95},
        {"epoch": 2, "step": 102, "time_s": 1.5, "val/acc": 0.97},
    ]
    assert history.to_target(0.95) == {"val_acc": 0.95, "epoch": 1, "step": 68, "seconds": 1.0}
    assert history.to_target(0.99) == {"val_acc": 0.99, "epoch": None, "step": None, "seconds": None}


@pytest.mark.slow
def test_a_sweep_over_seeds_shares_one_split_and_answers_with_intervals_and_paired_tests(tmp_path):
    process = sweep(
        tmp_path,
        "optimizer=adam,adamw,sgd",
        "optimizer.lr=0.001",
        "optimizer.weight_decay=0",
        "seed=1,2,3",
        "target.val_acc=0.9",
    )
    assert process.returncode == 0, process.stderr
    splits_paths = sorted(tmp_path.glob("*/split.npz"))
    splits = [np.load(path) for path in splits_paths]
    assert len(splits) == 9 and all(np.array_equal(s["test"], splits[0]["test"]) for s in splits)  # one split
    # the jobs keep their confusion matrices as numbers: scripts/report.py draws them
    assert not list(tmp_path.glob("*/confusion_matrix.png"))
    assert all(np.asarray(results_of(p.parent)["confusion"]).sum() == len(splits[0]["test"]) for p in splits_paths)
    rows = {row["optimizer"]: row for row in settings_csv(tmp_path)}
    assert set(rows) == {"adam", "adamw", "sgd"} and {row["n"] for row in rows.values()} == {"3"}
    best = [name for name, row in rows.items() if row["verdict"] == "best"]
    assert best[0] in ("adam", "adamw")
    tie = "adamw" if best[0] == "adam" else "adam"
    # AdamW without weight decay computes Adam's numbers: a tie with p = 1, never a win
    assert rows[tie]["verdict"] == "tied" and float(rows[tie]["p_value"]) == 1.0
    assert rows[tie]["val/acc_mean"] == rows[best[0]]["val/acc_mean"]

    # sgd against the best by a paired t-test over seeds, Holm-adjusted over the two comparisons
    def val_acc(optimizer):
        jobs = [results_of(p.parent) for p in tmp_path.glob("*/results.json")]
        by_seed = {r["seed"]: r["metrics"]["val/acc"] for r in jobs if f"optimizer={optimizer}" in r["overrides"]}
        return [by_seed[seed] for seed in (1, 2, 3)]

    raw = stats.ttest_rel(val_acc("sgd"), val_acc(best[0])).pvalue
    assert float(rows["sgd"]["p_value"]) == pytest.approx(min(1.0, 2 * raw))  # Holm: the smallest p times 2
    assert rows["sgd"]["verdict"] == ("worse" if 2 * raw < 0.05 else "tied")
    for row in rows.values():
        assert float(row["val/acc_ci_low"]) <= float(row["val/acc_mean"]) <= float(row["val/acc_ci_high"])
    assert rows["sgd"]["to_target/seconds_reached"] == "0" and rows[best[0]]["to_target/seconds_reached"] == "3"
    markdown = (tmp_path / "settings.md").read_text()
    assert f"{best[0]} " in markdown and ": best;" in markdown and f"{tie} " in markdown and "tied (p=1)" in markdown
    assert "verdict" in process.stdout and "(95% CI, n=3): best" in process.stdout


@pytest.mark.slow
def test_a_cv_sweep_compares_its_settings_on_paired_folds(tmp_path):
    process = sweep(tmp_path, "cv.folds=3", "optimizer=adam,sgd", *ONE_EPOCH)
    assert process.returncode == 0, process.stderr
    rows = {row["optimizer"]: row for row in settings_csv(tmp_path)}
    assert rows["adam"]["n"] == rows["sgd"]["n"] == "3"
    assert rows["adam"]["verdict"] == "best" and rows["sgd"]["paired_by"] == "fold"
    tests = [np.load(tmp_path / job / f"fold_{fold}" / "split.npz")["test"] for job in "01" for fold in range(3)]
    assert all(np.array_equal(tests[fold], tests[3 + fold]) for fold in range(3))  # the same folds for both


@pytest.mark.slow
def test_replicates_train_on_one_split_and_report_their_mean_and_interval(train, tmp_path):
    process, run_dir = train("replicates=3", "replicates_vectorized=false", "data.split_seed=7", *ONE_EPOCH)
    assert process.returncode == 0, process.stderr
    results = results_of(run_dir)
    seeds = [entry["seed"] for entry in results["replicates"]]
    assert seeds == [42, 43, 44] and [entry["dir"] for entry in results["replicates"]] == [
        "replicate_0",
        "replicate_1",
        "replicate_2",
    ]
    accuracies = [results_of(run_dir / f"replicate_{i}")["metrics"]["val/acc"] for i in range(3)]
    assert results["mean"]["val/acc"] == pytest.approx(np.mean(accuracies))
    assert results["std"]["val/acc"] == pytest.approx(np.std(accuracies, ddof=1))
    low, high = stats.t.interval(0.95, 2, loc=np.mean(accuracies), scale=stats.sem(accuracies))
    assert results["ci95"]["val/acc"] == pytest.approx([low, high])
    tests = [np.load(run_dir / f"replicate_{i}" / "split.npz")["test"] for i in range(3)]
    assert all(np.array_equal(test, tests[0]) for test in tests)
    labels = load_digits().target
    drawn = {seed: make_splits(len(labels), {"label": labels}, (0.6, 0.2, 0.2), seed)[0].test for seed in (7, 42)}
    assert np.array_equal(tests[0], drawn[7]) and not np.array_equal(tests[0], drawn[42])  # data.split_seed drew it
    assert (
        len(set(accuracies)) > 1
        or len({results_of(run_dir / f"replicate_{i}")["metrics"]["val/loss"] for i in range(3)}) == 3
    )  # other seeds, other models
    report = run_script("scripts/report.py", str(run_dir))
    assert report.returncode == 0, report.stderr
    assert (run_dir / "curves.png").is_file() and "3 replicates" in (run_dir / "report.md").read_text()

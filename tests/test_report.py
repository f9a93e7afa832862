"""scripts/report.py on a run, a CV run and a sweep folder; the per-step losses and confusion matrix of a run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, results_of, run_script
from PIL import Image

from descent.plots import ewa


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One real 2-epoch run, copied by the tests that need a run folder."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    process = run_script("train.py", *FAST, f"hydra.run.dir={run_dir}")
    assert process.returncode == 0, process.stderr
    return run_dir


def copy_run(source: Path, target: Path, overrides: list[str] | None = None, shift: float = 0.0) -> Path:
    """A copy of a run folder with other overrides and val/acc, as another job or fold would leave it."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints"))
    results = results_of(target)
    results["metrics"] = {key: value + shift for key, value in results["metrics"].items()}
    if overrides is not None:
        results["overrides"] = overrides
        (target / ".hydra" / "overrides.yaml").write_text("".join(f"- {item}\n" for item in overrides))
    (target / "results.json").write_text(json.dumps(results))
    return target


def assert_readable_pngs_linked_from_report(folder: Path, names: list[str]) -> str:
    report = (folder / "report.md").read_text()
    for name in names:
        with Image.open(folder / name) as image:
            assert image.width >= 500 and image.height >= 300
            assert np.asarray(image.convert("L")).std() > 10  # drawn, not blank
        assert f"]({name})" in report
    return report


def test_a_run_writes_its_confusion_matrix_and_every_step_loss(trained_run):
    results = results_of(trained_run)
    with Image.open(trained_run / "confusion_matrix.png") as image:
        assert image.width > 300
    assert np.asarray(results["confusion"]).sum() == results["n_test"]  # the numbers the image shows
    with open(trained_run / "steps.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows] == list(range(1, results["steps"] + 1))
    assert {int(row["epoch"]) for row in rows} == {0, 1}
    assert all(np.isfinite(float(row["loss"])) for row in rows)


def test_run_report_draws_learning_curves_with_the_smoothed_step_loss(trained_run, tmp_path):
    run_dir = copy_run(trained_run, tmp_path / "run")
    process = run_script("scripts/report.py", str(run_dir), "--ewa-b", "0.8")
    assert process.returncode == 0, process.stderr
    report = assert_readable_pngs_linked_from_report(run_dir, ["learning_curves.png", "confusion_matrix.png"])
    assert "0.8 v_(t-1)" in report and "| val/acc |" in report


def test_cv_report_draws_fold_curves_and_mean_std_bars(trained_run, tmp_path):
    cv_dir = tmp_path / "cv"
    cv_dir.mkdir()
    folds = [results_of(copy_run(trained_run, cv_dir / f"fold_{i}", shift=0.01 * i)) for i in range(3)]
    metrics = list(folds[0]["metrics"])
    values = {m: [fold["metrics"][m] for fold in folds] for m in metrics}
    cv_results = {
        "status": "ok",
        "folds": folds,
        "mean": {m: float(np.mean(v)) for m, v in values.items()},
        "std": {m: float(np.std(v)) for m, v in values.items()},
    }
    (cv_dir / "results.json").write_text(json.dumps(cv_results))
    process = run_script("scripts/report.py", str(cv_dir))
    assert process.returncode == 0, process.stderr
    report = assert_readable_pngs_linked_from_report(cv_dir, ["fold_curves.png", "cv_metrics.png"])
    assert "3 folds" in report and "| fold_2 | ok |" in report


def test_sweep_report_answers_per_setting_and_never_plots_against_the_seed(trained_run, tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    jobs = [(32, 1, 0.0), (32, 2, 0.001), (32, 3, -0.001), ("full", 1, -0.2), ("full", 2, -0.21), ("full", 3, -0.19)]
    for job, (batch_size, seed, shift) in enumerate(jobs):
        copy_run(trained_run, sweep_dir / str(job), [f"data.batch_size={batch_size}", f"seed={seed}"], shift)
        results = results_of(sweep_dir / str(job))
        (sweep_dir / str(job) / "results.json").write_text(json.dumps({**results, "seed": seed}))
        (sweep_dir / str(job) / "confusion_matrix.png").unlink()  # a sweep's job leaves it to the report
    (sweep_dir / "6").mkdir()  # a failed job leaves only its results.json
    failed = {"status": "failed", "error": "ValueError: boom", "overrides": ["data.batch_size=64", "seed=1"]}
    (sweep_dir / "6" / "results.json").write_text(json.dumps(failed))
    process = run_script("scripts/report.py", str(sweep_dir))
    assert process.returncode == 0, process.stderr
    report = assert_readable_pngs_linked_from_report(sweep_dir, ["compare_data_batch_size.png", "curves.png"])
    first = report.splitlines()[2]
    assert first.startswith("**batch_size=32 ") and "(95% CI, n=3): best; batch_size=full " in first
    assert "worse (p=" in first
    assert "| batch_size=32 | 3 |" in report and "| batch_size=full | 3 |" in report  # a row per setting
    assert not list(sweep_dir.glob("*seed*.png")) and "seed" not in "".join(p.name for p in sweep_dir.glob("*.png"))
    assert "Failed jobs: 6" in report and (sweep_dir / "settings.csv").is_file()
    for job in range(6):  # drawn from each job's results.json
        with Image.open(sweep_dir / str(job) / "confusion_matrix.png") as image:
            assert image.width > 300 and np.asarray(image.convert("L")).std() > 10


def test_report_refuses_a_folder_that_is_neither_a_run_nor_a_sweep(tmp_path):
    process = run_script("scripts/report.py", str(tmp_path))
    assert process.returncode == 2 and "not a run folder" in process.stderr


def test_bias_corrected_ewa_equals_the_course_formula():
    y = np.random.default_rng(0).normal(5, 2, 50)
    for b in (0.5, 0.9, 0.98):
        t = np.arange(1, len(y) + 1)
        weighted = np.array([(1 - b) * np.sum(b ** (n - t[:n]) * y[:n]) for n in t])  # v_t unrolled from v_0 = 0
        np.testing.assert_allclose(ewa(y, b, bias_correction=False), weighted)
        np.testing.assert_allclose(ewa(y, b), weighted / (1 - b**t))
    assert ewa([3.0, 3.0, 3.0], 0.9).tolist() == pytest.approx([3.0, 3.0, 3.0])  # no pull towards v_0 = 0

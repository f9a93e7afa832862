"""scripts/report.py on a run, a CV run and a sweep folder; the per-step losses and confusion matrix of a run."""

from __future__ import annotations

import csv
import json
import re
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
    cv_results = {"status": "ok", "folds": folds, "mean": {m: float(np.mean(v)) for m, v in values.items()},
                  "std": {m: float(np.std(v)) for m, v in values.items()}}  # fmt: skip
    (cv_dir / "results.json").write_text(json.dumps(cv_results))
    process = run_script("scripts/report.py", str(cv_dir))
    assert process.returncode == 0, process.stderr
    report = assert_readable_pngs_linked_from_report(cv_dir, ["fold_curves.png", "cv_metrics.png"])
    assert "3 folds" in report and "| fold_2 | ok |" in report


def test_sweep_report_tables_every_job_and_names_the_winner_from_results_alone(trained_run, tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    for job, (batch_size, shift) in enumerate([(32, 0.0), (256, -0.05), ("full", -0.2)]):
        copy_run(trained_run, sweep_dir / str(job), [f"data.batch_size={batch_size}", "optimizer=adam"], shift)
    (sweep_dir / "3").mkdir()  # a failed job leaves only its results.json
    failed = {"status": "failed", "error": "ValueError: boom", "overrides": ["data.batch_size=64", "optimizer=adam"]}
    (sweep_dir / "3" / "results.json").write_text(json.dumps(failed))
    assert not (sweep_dir / "summary.csv").exists()
    process = run_script("scripts/report.py", str(sweep_dir))
    assert process.returncode == 0, process.stderr
    report = assert_readable_pngs_linked_from_report(sweep_dir, ["best_data_batch_size.png",
                                                                 "curves_data_batch_size.png"])  # fmt: skip
    rows = [line for line in report.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split(" | ")[1] for row in rows] == ["32", "256", "full", "64"]  # best val/acc first, failed last
    assert "**Best: job 0** (data.batch_size=32)" in report and "+0.0500 val/acc over the runner-up, job 1" in report
    assert "Failed jobs: 3" in report
    assert "| job | data.batch_size | status | val/acc |" in report  # only the swept key is a column


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

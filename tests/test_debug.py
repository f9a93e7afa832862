"""The debug presets (conf/debug/): Lightning's debugging flags as `debug=NAME`, each a run folder under logs/debug/."""

import csv

from conftest import results_of, run_script


def rows_of(run_dir):
    with open(run_dir / "metrics.csv") as file:
        return list(csv.DictReader(file))


def test_fdr_runs_one_batch_of_each_split_into_logs_debug(tmp_path):
    process = run_script("train.py", "debug=fdr", "callbacks.progress_bar=null", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    (run_dir,) = (tmp_path / "logs" / "debug" / "runs").iterdir()
    results = results_of(run_dir)
    assert results["status"] == "ok" and (results["epochs"], results["steps"]) == (1, 1)
    assert results["tested"] == "last" and "test/acc" in results["metrics"]
    assert (run_dir / "train.log").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert not (run_dir / "checkpoints").exists()  # fast_dev_run saves none


def test_limit_runs_two_epochs_of_a_few_batches(train):
    process, run_dir = train("debug=limit")
    assert process.returncode == 0, process.stderr
    results = results_of(run_dir)
    assert (results["epochs"], results["steps"]) == (2, 2 * 3)
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()


def test_overfit_fits_one_training_batch_to_train_acc_1(tmp_path):
    run_dir = tmp_path / "run"
    process = run_script("train.py", "debug=overfit", "callbacks.progress_bar=null", f"hydra.run.dir={run_dir}")
    assert process.returncode == 0, process.stderr
    rows = rows_of(run_dir)
    assert float(rows[-1]["train/acc"]) == 1.0 and len(rows) < 100  # stopped once fitted
    assert [int(row["step"]) for row in rows] == list(range(1, len(rows) + 1))  # one batch an epoch
    assert float(rows[-1]["train/loss"]) < float(rows[0]["train/loss"]) / 2


def test_profiler_writes_its_reports_in_the_run_folder(train):
    process, run_dir = train("debug=profiler")
    assert process.returncode == 0, process.stderr
    assert "run_training_epoch" in (run_dir / "fit-profiler.txt").read_text()
    assert "TEST Profiler Report" in (run_dir / "test-profiler.txt").read_text()

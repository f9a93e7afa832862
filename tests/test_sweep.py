"""Sweeps: the summary, failures that do not stop a sweep, re-runs that skip finished jobs, launchers, Optuna, DDP."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ENV, FAST, ROOT, compose_train, results_of, run_script

from descent import CONF_DIR
from descent.data.batches import TensorBatches
from descent.summary import print_summary, write_summary
from descent.sweep import claim_gpu, finished_results


def sweep(sweep_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    if env is None:
        return run_script("train.py", "-m", *FAST, f"hydra.sweep.dir={sweep_dir}", *overrides)
    command = [sys.executable, str(ROOT / "train.py"), "-m", *FAST, f"hydra.sweep.dir={sweep_dir}", *overrides]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def summary_rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv") as file:
        return list(csv.DictReader(file))


def fake_job(sweep_dir: Path, name: str, overrides: list[str], status: str | None, val_acc: float | None = None):
    """A job folder as a sweep leaves it: .hydra/ and, unless the job was killed, results.json."""
    folder = sweep_dir / name
    (folder / ".hydra").mkdir(parents=True)
    if status is not None:
        results = {
            "status": status,
            "error": "boom" if status == "failed" else None,
            "overrides": overrides,
            "metrics": {"val/acc": val_acc, "test/acc": val_acc},
            "epochs": 2,
            "duration_s": 1.5,
        }
        (folder / "results.json").write_text(json.dumps(results))
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {override}\n" for override in overrides))
    return folder


def test_the_summary_of_an_interrupted_sweep_has_every_job_folder_best_first(tmp_path):
    fake_job(tmp_path, "0", ["optimizer=sgd", "seed=1"], "ok", 0.9)
    fake_job(tmp_path, "1", ["optimizer=adam", "seed=1"], "ok", 0.95)
    fake_job(tmp_path, "2", ["optimizer=rmsprop", "seed=1"], "failed")
    fake_job(tmp_path, "3", ["optimizer=momentum", "seed=1"], None)  # killed before writing results.json
    columns, rows = write_summary(tmp_path)
    assert [row["job"] for row in rows[:2]] == ["1", "0"]
    assert {row["job"]: row["status"] for row in rows[2:]} == {"2": "failed", "3": "missing"}
    assert "optimizer" in columns and "seed" not in columns and "error" in columns  # seed is not swept
    markdown = (tmp_path / "summary.md").read_text()
    assert "Every job: `seed=1`" in markdown and markdown.count("\n| ") == 1 + 4
    assert [row["optimizer"] for row in summary_rows(tmp_path)] == ["adam", "sgd", "rmsprop", "momentum"]


def test_the_printed_summary_keeps_swept_keys_whole_in_80_columns(tmp_path):
    from rich.console import Console

    for job, (optimizer, dropout) in enumerate([("adam", 0.0), ("adam", 0.2), ("sgd", 0.0), ("sgd", 0.2)]):
        fake_job(tmp_path, str(job), [f"optimizer={optimizer}", f"model.dropout={dropout}"], "ok", 0.9 + job / 100)
    console = Console(width=80, record=True, force_terminal=False)
    print_summary(tmp_path, *write_summary(tmp_path), console=console)
    lines = console.export_text().splitlines()
    header = " ".join(lines[1:4])  # under the title
    assert "model." in header and "dropout" in header and "optimizer" in header  # broken after the dot, else whole
    assert all(len(line) <= 80 for line in lines) and sum(" ok " in line for line in lines) == 4


def test_the_summary_command_rebuilds_it_and_refuses_a_folder_without_jobs(tmp_path):
    fake_job(tmp_path / "sweep", "0", ["seed=1"], "ok", 0.9)
    process = subprocess.run(
        [sys.executable, "-m", "descent.sweep", str(tmp_path / "sweep")], env=ENV, capture_output=True, text=True
    )
    assert process.returncode == 0 and "0.9000" in process.stdout
    assert (tmp_path / "sweep" / "summary.csv").is_file()
    process = subprocess.run(
        [sys.executable, "-m", "descent.sweep", str(tmp_path)], env=ENV, capture_output=True, text=True
    )
    assert process.returncode == 2 and f"sweep_dir={tmp_path} is not allowed" in process.stderr


def test_only_a_finished_job_with_the_same_overrides_is_skipped(tmp_path):
    fake_job(tmp_path, "0", ["optimizer=sgd"], "ok", 0.9)
    fake_job(tmp_path, "1", ["optimizer=sgd"], "failed")
    fake_job(tmp_path, "2", ["optimizer=sgd"], "diverged", 0.1)
    assert finished_results(tmp_path / "0", ["optimizer=sgd"])["status"] == "ok"
    assert finished_results(tmp_path / "0", ["optimizer=sgd", "skip_done=true"]) is not None
    assert finished_results(tmp_path / "0", ["optimizer=adam"]) is None  # another sweep's job in that folder
    assert finished_results(tmp_path / "1", ["optimizer=sgd"]) is None
    assert finished_results(tmp_path / "2", ["optimizer=sgd"])["status"] == "diverged"
    assert finished_results(tmp_path / "3", ["optimizer=sgd"]) is None


def test_parallel_jobs_claim_different_gpus(tmp_path):
    with claim_gpu(tmp_path, 2) as first, claim_gpu(tmp_path, 2) as second:
        assert {first, second} == {0, 1}
    with claim_gpu(tmp_path, 2) as again:
        assert again == 0  # released when the job ends


def test_ddp_shards_cover_every_evaluation_sample_once_and_give_ranks_equal_training_steps():
    images, labels = torch.arange(11.0).reshape(11, 1), torch.arange(11)
    shards = [TensorBatches(images, labels, 4, shuffle=False, rank=r, world_size=2) for r in range(2)]
    seen = sorted(int(y) for shard in shards for _, batch in shard for y in batch)
    assert seen == list(range(11))
    train = [TensorBatches(images, labels, 2, shuffle=True, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(train[0]) == len(train[1]) == 2  # 5 samples each, the last batch of one folded
    taken = [int(y) for shard in train for _, batch in shard for y in batch]
    assert len(taken) == len(set(taken)) == 10


def test_experiment_configs_are_ready_for_a_sweep():
    cfg = compose_train("experiment=batch_sizes")
    assert cfg.model.batch_norm is False
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        experiments = (
            ("optimizers", "optimizer"),
            ("batch_sizes", "data.batch_size"),
            ("batch_norm", "model.batch_norm"),
            ("dropout", "model.dropout"),
        )
        for name, key in experiments:
            composed = compose("train", [f"experiment={name}"], return_hydra_config=True)
            assert key in composed.hydra.sweeper.params and "seed" not in composed.hydra.sweeper.params
            assert composed.replicates == 5  # each setting over 5 seeds on one split


@pytest.mark.slow
def test_a_sweep_writes_a_summary_row_per_job(tmp_path):
    process = sweep(tmp_path, "optimizer=sgd,adam", "data.batch_size=32,full")
    assert process.returncode == 0, process.stderr
    rows = summary_rows(tmp_path)
    assert len(rows) == 4 and {row["status"] for row in rows} == {"ok"}
    assert {(row["optimizer"], row["data.batch_size"]) for row in rows} == {
        ("sgd", "32"),
        ("sgd", "full"),
        ("adam", "32"),
        ("adam", "full"),
    }
    accuracies = [float(row["val/acc"]) for row in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert all(float(row["duration_s"]) > 0 and float(row["peak_rss_mb"]) > 0 for row in rows)
    assert (tmp_path / "summary.md").read_text().count("| ok |") == 4
    assert len(re.findall(r" ok +0\.\d{4} ", process.stdout)) == 4  # the rich table: status, val/acc


@pytest.mark.slow
def test_a_failed_job_does_not_stop_the_sweep_which_exits_non_zero_and_a_rerun_skips_finished_jobs(tmp_path):
    process = sweep(tmp_path, "trainer.max_epochs=1", "optimizer.lr=0.01,-1,0.001")
    assert process.returncode != 0
    assert "Traceback" not in process.stdout + process.stderr
    assert sorted(row["status"] for row in summary_rows(tmp_path)) == ["failed", "ok", "ok"]
    failed = results_of(tmp_path / "1")
    assert failed["status"] == "failed" and "optimizer.lr=-1 is not allowed" in failed["error"]
    assert "job 1: optimizer.lr=-1 is not allowed" in process.stdout  # under the summary table, whole
    finished = (tmp_path / "0" / "results.json").read_text()

    again = sweep(tmp_path, "trainer.max_epochs=1", "optimizer.lr=0.01,-1,0.001")
    assert again.returncode != 0  # the failed job ran again, and failed again
    assert len(re.findall(r"skipped: .*results.json says ok", again.stdout + again.stderr)) == 2
    assert (tmp_path / "0" / "results.json").read_text() == finished


@pytest.mark.slow
def test_a_diverged_job_is_a_result_not_a_failure(tmp_path):
    process = sweep(tmp_path, "optimizer=sgd", "optimizer.lr=0.05,1e8")
    assert process.returncode == 0, process.stderr
    assert sorted(row["status"] for row in summary_rows(tmp_path)) == ["diverged", "ok"]


@pytest.mark.slow
def test_joblib_jobs_split_the_cores_between_them(tmp_path):
    env = {key: value for key, value in ENV.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    process = sweep(
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "trainer.max_epochs=1",
        "data.batch_size=full",
        "seed=1,2",
        env=env,
    )
    assert process.returncode == 0, process.stderr
    cores = len(os.sched_getaffinity(0))
    for job in ("0", "1"):
        assert f"threads={max(1, cores // 2)}" in (tmp_path / job / "train.log").read_text()
    assert len(summary_rows(tmp_path)) == 2


@pytest.mark.slow
def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    process = sweep(tmp_path, "hydra/launcher=submitit_local", "trainer.max_epochs=1", "seed=1,2")
    assert process.returncode == 0, process.stderr
    assert [row["status"] for row in summary_rows(tmp_path)] == ["ok", "ok"]


@pytest.mark.slow
def test_an_optuna_search_runs_and_its_study_can_be_resumed(tmp_path):
    import optuna

    search = [
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "trainer.max_epochs=1",
        f"paths.log_dir={tmp_path}/logs",
        "hydra.sweeper.study_name=resumed",
    ]
    first = run_script("train.py", *FAST, *search, f"hydra.sweep.dir={tmp_path}/first")
    assert first.returncode == 0, first.stderr
    assert len(summary_rows(tmp_path / "first")) == 2
    assert "best_value" in (tmp_path / "first" / "optimization_results.yaml").read_text()
    second = run_script("train.py", *FAST, *search, f"hydra.sweep.dir={tmp_path}/second")
    assert second.returncode == 0, second.stderr
    study = optuna.load_study(study_name="resumed", storage=f"sqlite:///{tmp_path}/logs/optuna.db")
    assert len(study.trials) == 4


@pytest.mark.slow
@pytest.mark.parametrize("batch_sizes", ["choice(32,100000)", "choice(100000)"])
def test_failed_optuna_trials_are_recorded_as_failed_and_the_search_goes_on(tmp_path, batch_sizes):
    import optuna

    search = [
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=4",
        "trainer.max_epochs=1",
        "hydra.sweeper.study_name=s",
        f"hydra.sweeper.params={{data.batch_size:'{batch_sizes}'}}",
        f"paths.log_dir={tmp_path}",
    ]
    process = run_script("train.py", *FAST, *search, f"hydra.sweep.dir={tmp_path}/sweep")
    output = process.stdout + process.stderr
    assert process.returncode == 1 and "Traceback" not in output  # batch 100000 > 1077 training samples: failed
    rows = summary_rows(tmp_path / "sweep")
    assert len(rows) == 4 and all(
        row["status"] == ("ok" if row.get("data.batch_size") == "32" else "failed") for row in rows
    )
    states = [
        trial.state for trial in optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db").trials
    ]
    assert len(states) == 4 and optuna.trial.TrialState.FAIL in states
    if batch_sizes == "choice(100000)":
        assert set(states) == {optuna.trial.TrialState.FAIL}
        assert "no trial finished (all failed)" in output
    else:
        assert optuna.trial.TrialState.COMPLETE in states
        assert "best_value" in (tmp_path / "sweep" / "optimization_results.yaml").read_text()


def ddp_run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_script(
        "train.py",
        *FAST,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.run.dir={run_dir}",
        *overrides,
    )


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_gives_one_run_whose_test_numbers_a_single_device_reproduces(tmp_path):
    process = ddp_run(tmp_path / "run")
    assert process.returncode == 0, process.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["run"]
    assert not list((tmp_path / "run").glob("*/results.json"))
    results = results_of(tmp_path / "run")
    assert results["status"] == "ok" and results["steps"] == 2 * 17  # 1077 // 2 samples a device, 32 a batch
    evaluated = run_script(
        "eval.py", f"ckpt_path={tmp_path}/run/checkpoints/best.ckpt", f"hydra.run.dir={tmp_path}/eval"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    single = results_of(tmp_path / "eval")["metrics"]
    assert single["test/acc"] == results["metrics"]["test/acc"]
    assert single["test/loss"] == pytest.approx(results["metrics"]["test/loss"], rel=1e-5)


@pytest.mark.slow
def test_ddp_inside_a_sweep_is_refused_with_what_to_use_instead(tmp_path):
    process = sweep(tmp_path, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "seed=1")
    assert process.returncode != 0
    error = results_of(tmp_path / "0")["error"]
    assert "trainer.strategy='ddp' is not allowed" in error and "submitit_slurm" in error
    assert [path.name for path in tmp_path.iterdir() if path.is_dir()] == ["0"]


@pytest.mark.slow
def test_sync_batchnorm_on_cpu_is_refused(tmp_path):
    process = ddp_run(tmp_path / "run", "trainer.sync_batchnorm=true")
    assert process.returncode == 2
    assert "trainer.sync_batchnorm=True is not allowed" in process.stdout + process.stderr


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.mark.slow
@needs_two_gpus
def test_ddp_on_two_gpus_gives_one_run(tmp_path):
    process = run_script(
        "train.py",
        *FAST,
        "trainer=ddp",
        "trainer.accelerator=gpu",
        "trainer.devices=2",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert process.returncode == 0, process.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["run"]
    assert results_of(tmp_path / "run")["status"] == "ok"


@pytest.mark.slow
@needs_two_gpus
def test_parallel_sweep_jobs_run_one_a_gpu(tmp_path):
    process = sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "trainer=gpu", "seed=1,2")
    assert process.returncode == 0, process.stderr
    gpus = {re.search(r"runs on GPU (\d)", (tmp_path / job / "train.log").read_text()).group(1) for job in "01"}
    assert gpus == {"0", "1"}

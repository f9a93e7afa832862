"""The real train.py and eval.py through Hydra, a few epochs each."""

import csv

import numpy as np
import pytest
import torch
from conftest import results_of, run_script

CONTRACT_COLUMNS = ["epoch", "step", "time_s", "train/loss", "train/acc", "val/loss", "val/acc", "lr"]


def test_a_run_writes_the_contract_files(train):
    process, run_dir = train()
    assert process.returncode == 0, process.stderr
    results = results_of(run_dir)
    assert results["status"] == "ok" and results["error"] is None
    assert results["epochs"] == 2 and results["steps"] == 2 * 34
    assert (results["n_train"], results["n_val"], results["n_test"]) == (1077, 360, 360)
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"):
        assert 0 <= results["metrics"][key] < 10
    for key in ("duration_s", "train_samples_per_s", "peak_rss_mb"):
        assert results[key] > 0
    assert "trainer.max_epochs=2" in results["overrides"]
    with open(run_dir / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 and all(column in rows[0] for column in CONTRACT_COLUMNS)
    assert float(rows[1]["time_s"]) > float(rows[0]["time_s"]) > 0
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "train.log").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
    with np.load(run_dir / "split.npz") as split:
        assert sorted(np.concatenate([split["train"], split["val"], split["test"]])) == list(range(1797))


def test_reported_metrics_are_those_of_the_best_val_epoch_not_the_last(train):
    process, run_dir = train("trainer.max_epochs=6", "optimizer.lr=0.05")
    assert process.returncode == 0, process.stderr
    results = results_of(run_dir)
    with open(run_dir / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    accuracies = [float(row["val/acc"]) for row in rows]
    best = int(np.argmax(accuracies))
    assert results["best_epoch"] == int(rows[best]["epoch"])
    assert results["metrics"]["val/acc"] == pytest.approx(accuracies[best])
    assert results["metrics"]["train/loss"] == pytest.approx(float(rows[best]["train/loss"]))
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert checkpoint["epoch"] == results["best_epoch"]


def test_last_ckpt_is_the_last_epoch_even_when_the_best_one_is_older(train):
    # best = the highest val/loss: the first epoch, as the loss falls; Lightning's save_last alone would copy it
    process, run_dir = train("trainer.max_epochs=3", "callbacks.model_checkpoint.monitor=val/loss")
    assert process.returncode == 0, process.stderr
    best, last = (torch.load(run_dir / "checkpoints" / name, weights_only=True) for name in ("best.ckpt", "last.ckpt"))
    assert best["epoch"] == 0 and last["epoch"] == 2 and last["global_step"] == 3 * 34


def test_full_batch_makes_one_step_per_epoch(train):
    process, run_dir = train("data.batch_size=full", "trainer.max_epochs=3")
    assert process.returncode == 0, process.stderr
    results = results_of(run_dir)
    assert results["epochs"] == 3 and results["steps"] == 3


@pytest.mark.slow
def test_batch_size_one_without_batch_norm_makes_one_step_per_sample(train):
    process, run_dir = train(
        "data.batch_size=1", "model.batch_norm=false", "trainer.max_epochs=1", "optimizer=sgd", "optimizer.lr=0.01"
    )
    assert process.returncode == 0, process.stderr
    results = results_of(run_dir)
    assert results["steps"] == results["n_train"] == 1077


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_eval_reproduces_the_test_metrics_exactly(train, tmp_path, model):
    process, run_dir = train(f"model={model}")
    assert process.returncode == 0, process.stderr
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["model"]["_target_"] == f"descent.model.{model.upper()}"
    evaluated = run_script("eval.py", f"ckpt_path={run_dir}/checkpoints/best.ckpt", f"hydra.run.dir={tmp_path}/eval")
    assert evaluated.returncode == 0, evaluated.stderr
    eval_results = results_of(tmp_path / "eval")
    assert eval_results["metrics"]["test/acc"] == results_of(run_dir)["metrics"]["test/acc"]
    assert eval_results["metrics"]["test/loss"] == results_of(run_dir)["metrics"]["test/loss"]
    assert "test/acc" in evaluated.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgd", "momentum", "rmsprop", "adam", "adamw", "course_rmsprop", "course_adam"])
def test_every_optimizer_learns(train, name):
    process, run_dir = train(f"optimizer={name}", "trainer.max_epochs=5")
    assert process.returncode == 0, process.stderr
    assert results_of(run_dir)["metrics"]["test/acc"] > 0.8  # chance is 0.1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=-1", "optimizer.lr=-1 is not allowed: expected a finite learning rate > 0"),
        ("data.batch_size=0", "data.batch_size=0 is not allowed"),
        ("data.batch_size=100000", "at most the training split's 1077 samples"),
        ("data.batch_size=1", "model.batch_norm=false"),
        ("model.dropout=1.5", "model.dropout=1.5 is not allowed"),
        ("data.split=[0.5,0.2,0.2]", "data.split=[0.5, 0.2, 0.2] is not allowed"),
    ],
)
def test_bad_input_stops_with_one_message_and_no_traceback(train, override, message):
    process, run_dir = train(override)
    assert process.returncode == 2
    output = process.stdout + process.stderr
    assert message in output
    assert "Traceback" not in output
    results = results_of(run_dir)
    assert results["status"] == "failed" and message in results["error"]
    assert not (run_dir / "checkpoints").exists()


def test_an_unknown_key_is_refused_by_struct_mode(train):
    process, _ = train("model.hiden_dims=[8]")
    assert process.returncode != 0
    assert "hiden_dims" in process.stderr and "Traceback" not in process.stderr


def test_a_missing_checkpoint_is_refused_by_eval(tmp_path):
    process = run_script("eval.py", f"ckpt_path={tmp_path}/nope.ckpt", f"hydra.run.dir={tmp_path}/eval")
    assert process.returncode == 2
    assert "ckpt_path=" in process.stdout + process.stderr and "Traceback" not in process.stderr

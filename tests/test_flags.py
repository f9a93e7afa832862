"""Lightning's Trainer flags through the real train.py: each one a Lightning user passes works, with a sound
results.json and metrics.csv, or is refused before training with one line naming it."""

from __future__ import annotations

import csv
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_train, results_of, run_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from descent.callbacks import EpochHistory, GracefulStop
from descent.config import ConfigError
from descent.data.batches import TensorBatches, batch_bounds, limited_bounds
from descent.optim import fused_sgd_skips
from descent.trainer import build_trainer, lightning_limits, loader_fractions

SMALL = ["model.hidden_dims=[16]"]
BATCHES = 34  # digits' training batches of 32 (1,077 samples)


def rows_of(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as file:
        return list(csv.DictReader(file))


def steps_of(run_dir: Path) -> list[int]:
    with open(run_dir / "steps.csv") as file:
        return [int(row["step"]) for row in csv.DictReader(file)]


def trained(train, *overrides: str) -> tuple[dict, list[dict[str, str]], str, Path]:
    process, run_dir = train(*SMALL, *overrides)
    assert process.returncode == 0, process.stdout + process.stderr
    return results_of(run_dir), rows_of(run_dir), process.stdout + process.stderr, run_dir


def refused(process: subprocess.CompletedProcess) -> str:
    """The one error line of a refused run."""
    output = process.stdout + process.stderr
    assert process.returncode == 2, output
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "[ERROR]" in line]
    return line


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    process = run_script("train.py", *FAST, *SMALL, f"hydra.run.dir={run_dir}")
    assert process.returncode == 0, process.stderr
    return run_dir


def test_a_fraction_of_a_single_batch_keeps_that_fraction_of_its_samples():
    assert limited_bounds([(0, 360)], 0.5) == [(0, 180)]  # digits' one validation batch: Lightning refuses it
    assert limited_bounds(batch_bounds(1077, 32), 0.5) == batch_bounds(1077, 32)[:17]  # Lightning's own count
    assert limited_bounds([(0, 10)], 0.01) == [(0, 1)]
    loader = TensorBatches(torch.zeros(360, 2), torch.arange(360), 1024, shuffle=False, fraction=0.25)
    assert [len(labels) for _, labels in loader] == [90]


def test_fractions_are_applied_by_our_loaders_and_lightning_is_given_whole_parts():
    cfg = {"limit_train_batches": 0.5, "limit_val_batches": 3, "limit_test_batches": 0.25}
    assert loader_fractions(cfg) == {"train": 0.5, "test": 0.25}  # a count stays Lightning's
    assert lightning_limits(cfg) == {"limit_train_batches": 1.0, "limit_test_batches": 1.0}
    assert loader_fractions({"overfit_batches": 0.1}) == {"train": 0.1, "val": 0.1}
    assert lightning_limits({"overfit_batches": 0.1}) == {"overfit_batches": 1.0}


def test_fast_dev_run_trains_one_batch_and_says_it_skips_checkpoints(train):
    results, rows, output, run_dir = trained(train, "+trainer.fast_dev_run=true")
    assert results["fast_dev_run"] == 1 and results["epochs"] == 1 and results["steps"] == 1
    assert results["tested"] == "last" and "test/acc" in results["metrics"] and len(rows) == 1
    assert "trainer.fast_dev_run skips checkpoints" in output and "model_checkpoint=null" not in output
    assert not (run_dir / "checkpoints" / "best.ckpt").exists()


def test_limit_batches_fractions_train_on_that_share_and_evaluate_a_fraction_of_a_single_batch(train):
    results, rows, _, run_dir = trained(
        train, "+trainer.limit_train_batches=0.5", "+trainer.limit_val_batches=0.5", "+trainer.limit_test_batches=0.25"
    )
    assert results["steps"] == BATCHES and steps_of(run_dir) == list(range(1, BATCHES + 1))  # 17 batches an epoch
    for key, samples in (("val/acc", 180), ("test/acc", 90)):  # one batch of 360 samples, where Lightning refuses
        correct = results["metrics"][key] * samples
        assert correct == pytest.approx(round(correct), abs=1e-3)  # a count out of 180 (90) samples
    assert float(rows[-1]["val/acc"]) == results["metrics"]["val/acc"]


def test_val_check_interval_adds_a_row_per_validation_and_keeps_the_best_one(train):
    results, rows, _, run_dir = trained(train, "+trainer.val_check_interval=0.5")
    assert [(int(row["epoch"]), int(row["step"])) for row in rows] == [(0, 17), (0, 34), (1, 51), (1, 68)]
    best = max(rows, key=lambda row: float(row["val/acc"]))
    assert results["best_step"] == int(best["step"]) and results["best_epoch"] == int(best["epoch"])
    assert results["validations"] == 4 and results["metrics"]["val/acc"] == float(best["val/acc"])
    assert torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["global_step"] == int(best["step"])


def test_an_int_val_check_interval_validates_every_n_batches_and_each_epoch_end_still_gets_a_row(train):
    _, rows, _, _ = trained(train, "+trainer.val_check_interval=10")
    assert [int(row["step"]) for row in rows if row["val/loss"]] == [10, 20, 30, 44, 54, 64]
    assert [int(row["step"]) for row in rows if not row["val/loss"]] == [34, 68]  # train metrics of 4 batches each


def test_early_stopping_counts_validations_and_can_stop_mid_epoch(train):
    results, rows, _, _ = trained(
        train,
        "+trainer.val_check_interval=0.25",
        "trainer.max_epochs=20",
        "optimizer.lr=0.05",
        "callbacks.early_stopping.patience=1",
    )
    assert results["epochs"] < 20 and results["steps"] % BATCHES != 0  # stopped at a validation inside an epoch
    assert rows[-1]["val/loss"] and int(rows[-1]["step"]) == results["steps"]


def test_check_val_every_n_epoch_chooses_the_best_among_the_validated_epochs(train):
    results, rows, _, _ = trained(train, "+trainer.check_val_every_n_epoch=2", "trainer.max_epochs=4")
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2, 3]  # every epoch keeps its train metrics
    assert [int(row["epoch"]) for row in rows if row["val/acc"]] == [1, 3]
    assert results["best_epoch"] in (1, 3) and results["validations"] == 2 and results["epochs"] == 4


def test_accumulated_optimizer_steps_are_the_steps_and_max_steps_stops_mid_epoch_with_a_row(train):
    results, rows, _, run_dir = trained(train, "+trainer.accumulate_grad_batches=2", "+trainer.max_steps=25")
    assert results["steps"] == 25 and results["epochs"] == 2 and results["best_epoch"] == 0  # 17 steps an epoch
    assert steps_of(run_dir) == list(range(1, 26))  # one loss an optimizer step, not one a batch
    assert int(rows[-1]["step"]) == 25 and rows[-1]["train/loss"] and not rows[-1]["val/loss"]


def test_max_time_ends_the_run_with_its_results(train):
    results, rows, _, _ = trained(train, "+trainer.max_time=00:00:00:01", "trainer.max_epochs=1000")
    assert results["status"] == "ok" and 1 <= results["epochs"] < 1000 and len(rows) >= 1


def test_mixed_precision_clipping_and_deterministic_algorithms_train(train):
    results, _, _, _ = trained(
        train,
        "+trainer.precision=bf16-mixed",
        "+trainer.gradient_clip_val=0.5",
        "+trainer.deterministic=true",
        "optimizer.fused=false",  # Lightning cannot clip what a fused step unscales itself (refused: test_config)
    )
    assert results["status"] == "ok" and results["steps"] == 2 * BATCHES
    assert all(0 <= value < 10 for value in results["metrics"].values())


def test_a_sanity_check_changes_no_number_and_computes_no_train_metrics(train, baseline):
    results, rows, output, _ = trained(train, "trainer.num_sanity_val_steps=2")
    assert results["metrics"] == results_of(baseline)["metrics"] and len(rows) == 2
    assert "called before the ``update`` method" not in output  # torchmetrics' warning for the empty train metrics


def test_overfit_batches_trains_on_the_same_unshuffled_batches(train):
    results, _, output, _ = trained(train, "+trainer.overfit_batches=2")
    assert results["steps"] == 4 and "turning off" not in output  # Lightning cannot unshuffle our loaders itself


def test_training_without_validation_tests_the_last_weights(train):
    results, rows, _, _ = trained(
        train, "+trainer.limit_val_batches=0", "callbacks.model_checkpoint=null", "callbacks.early_stopping=null"
    )
    assert results["validations"] == 0 and results["tested"] == "last" and len(rows) == 2
    assert "test/acc" in results["metrics"] and "train/loss" in results["metrics"]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("+trainer.val_check_interval=100", "trainer.val_check_interval=100 is not allowed: `val_check_interval`"),
        ("+trainer.limit_train_batches=0.001", "trainer.limit_train_batches=0.001 is not allowed"),
    ],
)
def test_a_setting_refused_once_the_data_is_known_is_one_line_naming_it(train, override, named):
    process, run_dir = train(*SMALL, override)
    assert named in refused(process)
    assert results_of(run_dir)["status"] == "failed"


@pytest.mark.skipif(not fused_sgd_skips(torch.bfloat16), reason="this torch's fused CPU SGD updates bf16 parameters")
def test_a_fused_sgd_that_would_not_train_bf16_parameters_is_one_line_naming_it(train):
    process, run_dir = train(*SMALL, "optimizer=sgd", "+optimizer.fused=true", "+trainer.precision=bf16-true")
    assert "optimizer.fused=True is not allowed: torch" in refused(process)
    assert results_of(run_dir)["status"] == "failed"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("+trainer.precision=17", "trainer.precision=17 is not allowed: Precision 17 is invalid"),
        ("+trainer.max_time=abc", "trainer.max_time='abc' is not allowed: `Timer(duration='abc')`"),
        ("+trainer.num_nodes=2", "trainer.num_nodes=2 is not allowed"),
        *([] if torch.cuda.is_available() else [("trainer.accelerator=gpu", "trainer.accelerator='gpu' is not")]),
    ],
)
def test_a_setting_the_trainer_refuses_is_a_config_error_naming_it(tmp_path, override, named):
    with pytest.raises(ConfigError) as error:
        build_trainer(compose_train(override), tmp_path, EpochHistory(tmp_path / "m.csv"), GracefulStop(tmp_path / "l"))
    assert str(error.value).startswith(named) and "\n" not in str(error.value)


# Hydra syntax: `+` adds a key the trainer config does not set; each key at most once an example
FLAG_VALUES = {
    "trainer.max_epochs": ["1", "3", "0", "-1"],
    "+trainer.limit_train_batches": ["0.5", "3", "0.01", "0", "1.5"],
    "+trainer.limit_val_batches": ["0.5", "1", "0"],
    "+trainer.limit_test_batches": ["0.3", "2"],
    "+trainer.val_check_interval": ["0.5", "10", "100", "2.0"],
    "+trainer.check_val_every_n_epoch": ["2", "0"],
    "+trainer.accumulate_grad_batches": ["3", "0"],
    "+trainer.max_steps": ["40", "0"],
    "+trainer.max_time": ["00:00:00:02", "abc"],
    "+trainer.precision": ["bf16-mixed", "16-mixed", "17"],
    "+trainer.gradient_clip_val": ["0.5", "-1"],  # refused under mixed precision, with Adam's fused step
    "+trainer.deterministic": ["true"],
    "trainer.num_sanity_val_steps": ["2", "-2"],
    "+trainer.overfit_batches": ["2", "0.1"],
    "+trainer.fast_dev_run": ["true", "2", "-1"],
    "+trainer.detect_anomaly": ["true", "maybe"],
    "+trainer.barebones": ["true"],
}
FLAGS = st.lists(
    st.sampled_from([f"{key}={value}" for key, values in FLAG_VALUES.items() for value in values]),
    min_size=1,
    max_size=3,
    unique_by=lambda override: override.split("=", 1)[0],
)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(FLAGS)
def test_any_trainer_flags_give_a_sound_run_or_one_line(flags):
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        process = run_script("train.py", *FAST, *SMALL, f"hydra.run.dir={run_dir}", *flags)
        output = process.stdout + process.stderr
        assert "Traceback" not in output, (flags, output)
        if process.returncode == 2:
            refused(process)
            return
        assert process.returncode == 0, (flags, output)
        results = results_of(run_dir)
        assert results["status"] in ("ok", "diverged"), flags
        assert results["epochs"] >= 1 or results.get("fast_dev_run"), flags
        assert {"train/loss", "test/acc", "test/loss"} <= results["metrics"].keys(), flags
        rows = rows_of(run_dir)
        assert rows and int(rows[-1]["step"]) == results["steps"] == steps_of(run_dir)[-1], flags
        assert int(rows[-1]["epoch"]) + 1 == results["epochs"], flags

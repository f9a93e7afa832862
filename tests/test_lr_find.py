"""lr_find=true: Lightning's learning-rate finder on the training split, then training with its suggestion, in the
optimizer config's own terms; the run is the one a user giving that lr by hand would get."""

import csv

import numpy as np
import pytest
import torch
from conftest import compose_train, results_of
from omegaconf import OmegaConf

from descent.config import ConfigError, validate
from descent.lr_find import steepest_fall, torch_lr_per_unit


def rows_of(path, drop=()):
    with open(path) as file:
        return [{key: value for key, value in row.items() if key not in drop} for row in csv.DictReader(file)]


def test_a_run_with_lr_find_equals_a_run_given_its_suggestion_by_hand(train, tmp_path):
    process, found_dir = train("lr_find=true", "optimizer=sgd", run_dir=tmp_path / "found")
    assert process.returncode == 0, process.stderr
    found = results_of(found_dir)["lr_find"]
    lr = found["suggested"]
    assert found["min_lr"] == pytest.approx(1e-8) and 1e-8 < lr < found["max_lr"] <= 1.0
    table = rows_of(found_dir / "lr_find.csv")
    assert len(table) == 100 and list(table[0]) == ["lr", "loss"]
    assert (found_dir / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    # the run trained with it and says so: its config, its checkpoints, its metrics
    assert OmegaConf.load(found_dir / ".hydra" / "config.yaml").optimizer.lr == lr
    last = torch.load(found_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert (
        last["hyper_parameters"]["optimizer"]["lr"] == lr
        and last["callbacks"]["descent"]["config"]["optimizer"]["lr"] == lr
    )
    assert {float(row["lr"]) for row in rows_of(found_dir / "metrics.csv")} == {lr}

    process, by_hand_dir = train("optimizer=sgd", f"optimizer.lr={lr!r}", run_dir=tmp_path / "by_hand")
    assert process.returncode == 0, process.stderr
    for name in ("metrics.csv", "steps.csv"):
        assert rows_of(found_dir / name, drop={"time_s"}) == rows_of(by_hand_dir / name, drop={"time_s"})
    assert results_of(found_dir)["metrics"] == results_of(by_hand_dir)["metrics"]


def test_momentums_suggestion_is_the_courses_a_not_torchs_lr(train):
    process, run_dir = train("lr_find=true", "optimizer=momentum", "trainer.max_epochs=1")
    assert process.returncode == 0, process.stderr
    found = results_of(run_dir)["lr_find"]
    assert found["min_lr"] == pytest.approx(1e-8) and found["max_lr"] == pytest.approx(1.0)  # searched in a's terms
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").optimizer.lr == found["suggested"]
    (row,) = rows_of(run_dir / "metrics.csv")
    assert float(row["lr"]) == pytest.approx(found["suggested"] * (1 - 0.9))  # torch's lr = a*(1-b)


@pytest.mark.parametrize(
    "name, unit",
    [
        ("sgd", 1),
        ("momentum", 0.1),
        ("rmsprop", 1),
        ("adam", 1),
        ("adamw", 1),
        ("course_rmsprop", 1),
        ("course_adam", 1),
    ],
)
def test_every_optimizer_config_converts_torchs_lr_by_its_own_rule(name, unit):
    optimizer = OmegaConf.to_container(compose_train(f"optimizer={name}").optimizer, resolve=True)
    assert torch_lr_per_unit(optimizer) == pytest.approx(unit)


def test_the_suggestion_is_the_steepest_fall_against_log_lr_not_lr():
    lrs = np.logspace(-8, 0, 100)
    losses = 2.3 - 1 / (1 + np.exp(-3 * (np.log10(lrs) + 2)))  # falls fastest at lr = 1e-2
    losses[10:30] += 1e-3 * np.sin(np.arange(20))  # a wiggle among the smallest lrs, as noise makes
    assert steepest_fall(list(lrs), list(losses)) == pytest.approx(1e-2, rel=0.25)
    assert steepest_fall(list(lrs[:11]), list(losses[:11])) is None  # too few steps after the warm-up


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["cv.folds=3"], "lr_find=True is not allowed: expected false with cv.folds"),
        (["+trainer.fast_dev_run=true"], "expected false with trainer.fast_dev_run"),
        (["debug=fdr"], "expected false with trainer.fast_dev_run"),
        (["replicates=3"], "expected false with replicates"),
    ],
)
def test_lr_find_is_refused_where_it_cannot_search(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_train("lr_find=true", *overrides))


def test_a_run_with_lr_find_trains_longer_with_its_own_command_and_keeps_its_suggestion(train, tmp_path):
    own = ["lr_find=true", "optimizer=sgd", "model.hidden_dims=[16]"]  # its command's optimizer.lr is sgd's default
    process, run_dir = train(*own)
    assert process.returncode == 0, process.stderr
    found = results_of(run_dir)["lr_find"]
    process, longer = train(
        *own, "trainer.max_epochs=3", f"ckpt_path={run_dir}/checkpoints/last.ckpt", run_dir=tmp_path / "longer"
    )
    assert process.returncode == 0, process.stdout + process.stderr
    results = results_of(longer)
    assert results["extended_from"] == 2 and results["epochs"] == 3 and results["lr_find"] == found

"""Replicates trained at once (replicates_vectorized=true): each one is a run of its own seed, to the tolerance that
floating-point order allows; each stops on its own; the folders feed the sweep's tables as sequential ones do; what
cannot be exact is refused; a signal's resume is exact."""

from __future__ import annotations

import csv
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ENV, ROOT, compose_train, results_of, run_script
from test_reliability import DURATIONS, start, wait_for_rows, without_durations, without_time

from descent.config import ConfigError, validate
from descent.data.batches import ReplicateBatches, TensorBatches
from descent.model import Classifier
from descent.summary import settings_rows

SMALL = ["model.hidden_dims=[32]", "callbacks.progress_bar=null"]
# val/loss must drop by 0.13 an epoch: with these settings the 3 replicates stop early, not all at the same epoch
EARLY = ["trainer.max_epochs=8", "callbacks.early_stopping.patience=1", "+callbacks.early_stopping.min_delta=0.13"]
# a single run of one seed with 2 threads instead of 1 (the sum order alone) moves, within these 8 epochs, its epoch
# losses by ~1e-4, a step's loss by ~2e-3, an accuracy by a sample, a weight by ~3e-3: the tolerances are that order's
LOSS_RTOL, STEP_RTOL, WEIGHT_ATOL = 2e-3, 1e-2, 2e-2


def rows_of(path: Path) -> list[dict[str, float]]:
    with open(path) as file:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]


def assert_rows_close(got: list[dict[str, float]], want: list[dict[str, float]], n: int) -> None:
    """Epoch rows alike: the same epochs and steps, losses to LOSS_RTOL, accuracies and F1 within 2 samples of n."""
    assert [(r["epoch"], r["step"]) for r in got] == [(r["epoch"], r["step"]) for r in want]
    for mine, theirs in zip(got, want, strict=True):
        for key, value in theirs.items():
            if key.endswith("loss"):
                assert mine[key] == pytest.approx(value, rel=LOSS_RTOL), key
            elif key.endswith(("acc", "f1")):
                assert mine[key] == pytest.approx(value, abs=2 / n), key


def test_each_replicates_batches_are_those_of_its_seeds_run():
    images, labels = torch.arange(2 * 23.0).reshape(23, 2), torch.arange(23)
    seeds = [3, 4, 9]
    stacked = ReplicateBatches(images, labels, batch_size=5, seeds=seeds)
    for epoch in (0, 1):
        stacked.set_epoch(epoch)
        runs = []
        for seed in seeds:
            run = TensorBatches(images, labels, batch_size=5, shuffle=True, seed=seed)
            run.set_epoch(epoch)
            runs.append(list(run))
        batches = list(stacked)
        assert len(batches) == len(runs[0]) == 5  # 23 = 5+5+5+5+3
        for step, (x, y) in enumerate(batches):
            for i in range(len(seeds)):
                assert torch.equal(x[i], runs[i][step][0]) and torch.equal(y[i], runs[i][step][1])
        assert not torch.equal(batches[0][1][0], batches[0][1][1])  # other seeds, other orders


@pytest.mark.slow
def test_replicates_trained_at_once_equal_runs_of_their_seeds_and_feed_the_settings_table(tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = ["replicates_vectorized=false,true", "replicates=3", *SMALL, *EARLY]
    process = run_script("train.py", "-m", f"hydra.sweep.dir={sweep_dir}", *overrides)
    assert process.returncode == 0, process.stderr
    sequential, at_once = sweep_dir / "0", sweep_dir / "1"
    assert results_of(sequential)["replicates"][0]["dir"] == "replicate_0" and not (sequential / "checkpoints").exists()
    assert (at_once / "checkpoints" / "last.ckpt").is_file()  # the batched state, what a resume reads
    epochs = []
    for i in range(3):
        mine, theirs = results_of(at_once / f"replicate_{i}"), results_of(sequential / f"replicate_{i}")
        assert mine["status"] == theirs["status"] == "ok" and mine["seed"] == theirs["seed"] == 42 + i
        n_val, n_test = theirs["n_val"], theirs["n_test"]
        for key in ("best_epoch", "epochs", "steps", "tested", "n_train", "batch_size"):
            assert mine[key] == theirs[key], key
        assert_rows_close(
            rows_of(at_once / f"replicate_{i}/metrics.csv"), rows_of(sequential / f"replicate_{i}/metrics.csv"), n_val
        )
        assert mine["metrics"].keys() == theirs["metrics"].keys()
        for key, value in theirs["metrics"].items():
            tolerance = (
                {"rel": LOSS_RTOL} if key.endswith("loss") else {"abs": 2 / (n_test if "test" in key else n_val)}
            )
            assert mine["metrics"][key] == pytest.approx(value, **tolerance), key
        steps = [rows_of(run / f"replicate_{i}/steps.csv") for run in (at_once, sequential)]
        assert [row["step"] for row in steps[0]] == [row["step"] for row in steps[1]]
        assert np.allclose([r["loss"] for r in steps[0]], [r["loss"] for r in steps[1]], rtol=STEP_RTOL, atol=0)
        best = [
            torch.load(run / f"replicate_{i}/checkpoints/best.ckpt", weights_only=True) for run in (at_once, sequential)
        ]
        assert best[0]["hyper_parameters"] == best[1]["hyper_parameters"] and best[0]["epoch"] == best[1]["epoch"]
        assert best[0]["state_dict"].keys() == best[1]["state_dict"].keys()
        for key, tensor in best[1]["state_dict"].items():
            torch.testing.assert_close(best[0]["state_dict"][key], tensor, rtol=0, atol=WEIGHT_ATOL, msg=key)
        epochs.append(mine["epochs"])
    assert len(set(epochs)) > 1 and min(epochs) < 8  # each replicate stopped early on its own
    for run in (sequential, at_once):  # a run counts its longest replicate's epochs and steps, as a single run would
        answer = results_of(run)
        assert answer["epochs"] == max(epochs)
        assert answer["steps"] == max(replicate["steps"] for replicate in answer["replicates"])
    with open(sweep_dir / "summary.csv") as file:
        assert {row["epochs"] for row in csv.DictReader(file)} == {str(max(epochs))}  # the sweep's table too

    model = Classifier.load_from_checkpoint(at_once / "replicate_1" / "checkpoints" / "best.ckpt", weights_only=True)
    assert model.hparams.model["hidden_dims"] == [32]
    evaluated = run_script(
        "eval.py", f"ckpt_path={at_once}/replicate_1/checkpoints/best.ckpt", f"hydra.run.dir={tmp_path}/eval"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert results_of(tmp_path / "eval")["metrics"] == pytest.approx(
        {k: v for k, v in results_of(at_once / "replicate_1")["metrics"].items() if k.startswith("test/")}, rel=1e-6
    )

    rows = {row["replicates_vectorized"]: row for row in settings_rows(sweep_dir, "val/acc", 0.05)}
    assert set(rows) == {"False", "True"} and rows["False"]["n"] == rows["True"]["n"] == 3
    assert rows["True"]["val/acc_mean"] == pytest.approx(rows["False"]["val/acc_mean"], abs=2 / 360)
    assert sorted(row["verdict"] for row in rows.values()) == ["best", "tied"]
    assert next(row for row in rows.values() if row["verdict"] == "tied")["paired_by"] == "seed"  # matched by seed


def poison(step: int, replicate: int):
    """A callback that turns replicate `replicate`'s inputs to NaN at global step `step`: its loss diverges there."""
    import pytorch_lightning as pl

    class Poison(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == step:
                batch[0][replicate] = math.nan

    return Poison()


def fit(tmp_path: Path, name: str, *overrides: str, extra=(), read_every=None) -> tuple[list[dict], Path]:
    """Three replicates at once, in this process, into tmp_path/name; their results and the run folder. `read_every`:
    the steps between two host reads of the divergence flags (by default every step, on CPU)."""
    from descent.data.sources import build_source
    from descent.data.splits import make_splits
    from descent.vectorized import fit_at_once

    cfg = compose_train(
        "replicates=3", "model.hidden_dims=[16]", "trainer.max_epochs=2", "logger=none", *SMALL[1:], *overrides
    )
    validate(cfg)
    source = build_source(cfg.data)
    split = make_splits(len(source.labels), {"label": source.labels}, tuple(cfg.data.split), cfg.data.split_seed)[0]
    run_dir = tmp_path / name
    torch.set_num_threads(1)
    return fit_at_once(cfg, source, split, run_dir, [0, 1, 2], extra=extra, read_every=read_every), run_dir


# 1: the host reads the flags at every step (CPU's default); 16: the device holds and puts back the replicates until
# the host reads them, 11 steps after the divergence (an accelerator's default)
@pytest.mark.parametrize("read_every", [1, 16])
def test_a_diverging_replicate_stops_alone_without_its_last_step_and_the_others_train_on(tmp_path, read_every):
    clean, clean_dir = fit(tmp_path, "clean", read_every=read_every)
    poisoned, poisoned_dir = fit(tmp_path, "poisoned", extra=[poison(step=5, replicate=1)], read_every=read_every)
    five_steps, five_dir = fit(tmp_path, "five", "+trainer.max_steps=5", read_every=read_every)

    assert [r["status"] for r in poisoned] == ["ok", "diverged", "ok"]
    for i in (0, 2):  # bit for bit: nothing of replicate 1 reaches them
        assert without_durations(poisoned[i]) == without_durations(clean[i])
        for name in ("metrics.csv", "steps.csv"):
            assert without_time(rows_of(poisoned_dir / f"replicate_{i}" / name)) == without_time(
                rows_of(clean_dir / f"replicate_{i}" / name)
            )
    diverged = poisoned[1]
    assert diverged["epochs"] == 1 and diverged["steps"] == 6  # its epoch's row, the skipped step counted as a run's
    assert len(rows_of(poisoned_dir / "replicate_1" / "steps.csv")) == 5  # the NaN step is not one of them
    assert clean[1]["epochs"] == 2
    # its weights stay those of its last finite step: replicate 1 of a run stopped after 5 steps
    kept = torch.load(poisoned_dir / "replicate_1" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    after_five = torch.load(five_dir / "replicate_1" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    weights = [key for key in after_five if key.endswith(("weight", "bias"))]
    assert weights and all(torch.equal(kept[key], after_five[key]) for key in weights)
    assert five_steps[1]["steps"] == 5


def run_files(results: list[dict], run_dir: Path) -> list:
    """Each of the three replicates' results (less durations), rows (less times) and whole last state_dict."""
    files = []
    for answer, folder in zip(results, (run_dir / f"replicate_{i}" for i in range(3)), strict=True):
        last = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        rows = [without_time(rows_of(folder / name)) for name in ("metrics.csv", "steps.csv")]
        files.append((without_durations(answer), *rows, {k: v.tolist() for k, v in last.items()}))
    return files


# with these, replicates 0 and 1 of fit() stop early after 6 and 7 epochs (steps 204 and 238)
STOPPING = [*EARLY, "model.hidden_dims=[32]"]


@pytest.mark.parametrize("overrides", [[], STOPPING], ids=["diverging", "stopping early"])
def test_the_flags_read_every_16_steps_give_what_a_read_every_step_gives(tmp_path, monkeypatch, overrides):
    from descent.vectorized import BatchedClassifier

    reads = []
    read = BatchedClassifier.read_flags
    monkeypatch.setattr(BatchedClassifier, "read_flags", lambda self: reads.append(self.read_every) or read(self))
    runs = {}
    for read_every in (1, 16):
        results, run_dir = fit(
            tmp_path, f"every_{read_every}", *overrides, extra=[poison(step=40, replicate=2)], read_every=read_every
        )
        assert results[2]["status"] == "diverged" and results[2]["steps"] == 41
        runs[read_every] = run_files(results, run_dir)
    # bit for bit (repr: a NaN equals a NaN), batch norm's statistics and the stopped replicates' weights too
    assert repr(runs[16]) == repr(runs[1])
    epochs = [answer["epochs"] for answer, *_ in runs[1]]
    # 34 batches an epoch: reads at steps 16 and 32 and at the last batch, at each validation and at the end of fit
    assert reads.count(16) == max(epochs) * (3 + 1) + 1 and reads.count(1) == max(epochs) * (34 + 1) + 1
    if overrides:
        assert epochs == [6, 7, 2]  # stopped early on their own, and diverged


def batched_from(run_dir: Path, read_every: int = 1):
    """A BatchedClassifier of three replicates configured as those of `run_dir` (its replicate_0's last.ckpt)."""
    from descent.vectorized import BatchedClassifier

    replicate = run_dir / "replicate_0" / "checkpoints" / "last.ckpt"
    classifiers = [Classifier.load_from_checkpoint(replicate, weights_only=True) for _ in range(3)]
    return BatchedClassifier(classifiers, [torch.Generator() for _ in range(3)], read_every=read_every)


@pytest.mark.parametrize("read_every", [1, 16])
def test_a_stopped_replicate_is_put_back_before_a_checkpoint_mid_epoch_is_taken(tmp_path, read_every):
    results, run_dir = fit(tmp_path, "cut", *STOPPING, "+trainer.max_steps=220", read_every=read_every)
    assert results[0]["steps"] == 204 and results[1]["steps"] == 220  # 0 stopped early, in the epoch before
    batched = batched_from(run_dir)
    batched.load_state_dict(torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    own = torch.load(run_dir / "replicate_0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    # Adam moves a replicate at every step, zero gradient or not: it must be back before last.ckpt is written
    for name, tensor in batched.net.replicate_state_dict(0).items():
        assert torch.equal(tensor, own[f"net.{name}"]), name


def test_a_checkpoint_between_two_reads_carries_the_flags_the_host_has_not_read(tmp_path):
    from descent.vectorized import STATE_KEY

    results, run_dir = fit(tmp_path, "cut", "+trainer.max_steps=8", extra=[poison(5, 1)], read_every=16)
    assert [r["status"] for r in results] == ["ok", "diverged", "ok"] and results[1]["steps"] == 6  # read at the end
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    state = checkpoint[STATE_KEY]
    assert state["stopped"] == [None, None, None]  # written at step 8, before the host read
    assert state["training"] == [True, False, True] and state["nonfinite_step"] == [-1, 5, -1]
    fresh = batched_from(run_dir, read_every=16)
    fresh.on_load_checkpoint(checkpoint)
    fresh.read_flags()
    assert fresh.diverged_at == [None, 5, None] and fresh.stopped == [None, 6, None]


REFUSED = [
    (
        ["optimizer=sgd", "optimizer._target_=torch.optim.LBFGS", "~optimizer.weight_decay"],
        "optimizer._target_",
    ),
    (["scheduler=plateau"], "scheduler.scheduler._target_"),
    (["trainer=ddp"], "trainer.strategy"),
    (["+trainer.precision=16-mixed"], "trainer.precision"),
    (["+trainer.limit_train_batches=2"], "trainer.limit_train_batches"),
    (["trainer.min_epochs=3"], "trainer.min_epochs"),
    (["+callbacks.timer._target_=pytorch_lightning.callbacks.Timer"], "callbacks.timer._target_"),
    (["+callbacks.model_checkpoint.save_top_k=3"], "callbacks.model_checkpoint.save_top_k"),
    (["callbacks.early_stopping.check_on_train_epoch_end=true"], "callbacks.early_stopping.check_on_train_epoch_end"),
    (["callbacks.early_stopping.monitor=val/auroc"], "callbacks.early_stopping.monitor"),
    (["cv.folds=3"], "replicates"),
]


@pytest.mark.parametrize(("overrides", "key"), REFUSED, ids=[key for _, key in REFUSED])
def test_what_cannot_be_exact_at_once_is_refused_naming_its_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}=.* is not allowed: "):
        validate(compose_train("replicates=3", *overrides))
    if key != "replicates":
        validate(compose_train("replicates=3", "replicates_vectorized=false", *overrides))  # one after another: fine


def test_what_replicates_at_once_support_passes():
    for overrides in (
        [],
        ["scheduler=cosine", "+trainer.gradient_clip_val=1", "+trainer.accumulate_grad_batches=2"],
        ["+trainer.precision=bf16-mixed", "+trainer.max_steps=100", "optimizer=momentum"],
        ["optimizer=course_adam", "callbacks.early_stopping=null", "callbacks.model_checkpoint=null"],
    ):
        validate(compose_train("replicates=3", *overrides))


def test_streamed_data_is_refused_in_one_line(train, tmp_path):
    process, _ = train(
        "replicates=2",
        "data=synthetic",
        "data.n_samples=300",
        "data.image_size=8",
        "data.stream.in_memory_mb=0",
        f"data.dir={tmp_path}/data",
    )
    assert process.returncode == 2
    errors = [line for line in (process.stdout + process.stderr).splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "data.stream.in_memory_mb=0" in errors[0] and "replicates_vectorized=false" in errors[0]
    assert "Traceback" not in process.stderr


# long epochs (batch 1) so that a signal lands mid-epoch; val/acc must rise by 6 samples an epoch: one replicate stops
# after 3 epochs, before the signal, the others train 4
INTERRUPTIBLE = [
    "replicates=3",
    "callbacks.progress_bar=null",
    "model.hidden_dims=[16]",
    "data.batch_size=1",
    "model.batch_norm=false",
    "optimizer=sgd",
    "optimizer.lr=0.01",
    "trainer.max_epochs=4",
    "callbacks.early_stopping.monitor=val/acc",
    "callbacks.early_stopping.mode=max",
    "callbacks.early_stopping.patience=0",
    "+callbacks.early_stopping.min_delta=0.015",
]


@pytest.fixture(scope="module")
def uninterrupted_at_once(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    process = run_script("train.py", *INTERRUPTIBLE, f"hydra.run.dir={run_dir}")
    assert process.returncode == 0, process.stderr
    return run_dir


def replicate_files(run_dir: Path) -> list:
    """Each replicate's results, rows and last weights (a stopped replicate's must not move after it stopped)."""
    files = []
    for folder in (run_dir / f"replicate_{i}" for i in range(3)):
        last = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        rows = [without_time(rows_of(folder / name)) for name in ("metrics.csv", "steps.csv")]
        weights = {key: tensor.tolist() for key, tensor in last.items()}
        files.append((without_durations(results_of(folder)), *rows, weights))
    return files


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "how"), [(signal.SIGTERM, "ckpt_path"), (signal.SIGINT, "same command")])
def test_replicates_at_once_stopped_by_a_signal_resume_exactly(uninterrupted_at_once, tmp_path, signum, how):
    epochs = [results_of(uninterrupted_at_once / f"replicate_{i}")["epochs"] for i in range(3)]
    assert min(epochs) == 3 and max(epochs) == 4  # one stopped early, before the epoch the signal lands in
    run_dir = tmp_path / "run"
    process = start(run_dir, *INTERRUPTIBLE)
    wait_for_rows(process, run_dir / f"replicate_{epochs.index(4)}", 3)
    time.sleep(0.2)  # into the fourth epoch
    process.send_signal(signum)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 128 + signum, output
    assert results_of(run_dir)["status"] == "interrupted"
    assert {results_of(run_dir / f"replicate_{i}")["status"] for i in range(3)} == {"interrupted"}
    assert f"resume with: python train.py ckpt_path={run_dir}/checkpoints/last.ckpt" in output
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] % 1077 != 0  # written where the signal stopped it, not at an epoch's end

    if how == "ckpt_path":
        resumed = run_script("train.py", f"ckpt_path={run_dir}/checkpoints/last.ckpt", f"hydra.run.dir={run_dir}")
    else:
        resumed = run_script("train.py", *INTERRUPTIBLE, f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert replicate_files(run_dir) == replicate_files(uninterrupted_at_once)
    mine, theirs = results_of(run_dir), results_of(uninterrupted_at_once)
    assert {k: v for k, v in mine.items() if k not in (*DURATIONS, "replicates")} == {
        k: v for k, v in theirs.items() if k not in (*DURATIONS, "replicates")
    }


def test_the_workflow_bench_runs_and_prints_its_ratios():
    process = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            "--workflow",
            "--epochs=1",
            "--seeds=1",
            "--replicates=2",
            "--optimizers=sgd",
            "--repeats=1",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr
    lines = process.stdout.splitlines()
    assert any(line.startswith("ratio (a)/(c1): ") and "goal <= 1.3" in line for line in lines), process.stdout
    assert any(line.startswith("ratio (b)/(c2): ") and "goal <= 1.0" in line for line in lines), process.stdout

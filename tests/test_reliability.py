"""Same seed same numbers, exact resume after SIGKILL/SIGTERM/SIGINT, divergence, safe checkpoints, no leaked secret.

The kill tests use batch size 1 (about a thousand steps an epoch) so that an epoch lasts long enough to signal the
run in its middle, without any delay added to the code under test.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ENV, FAST, ROOT, results_of, run_script

from descent import CONF_DIR
from descent.checkpoints import AtomicCheckpointIO, BackgroundCheckpointIO, rng_states, set_rng_states
from descent.data.batches import TensorBatches
from descent.data.streaming import StreamingBatches
from descent.trainer import plugins

SMALL = [*FAST, "model.hidden_dims=[16]"]
SLOW_EPOCHS = [
    "callbacks.progress_bar=null",
    "model.hidden_dims=[16]",
    "data.batch_size=1",
    "model.batch_norm=false",
    "optimizer=sgd",
    "optimizer.lr=0.01",
    "trainer.max_epochs=4",
    "callbacks.last_checkpoint.train_time_interval.seconds=0.5",  # last.ckpt on its cadence, mid-epoch too
]
DURATIONS = ("duration_s", "train_samples_per_s", "peak_rss_mb")


def rows_of(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as file:
        return list(csv.DictReader(file))


def without_durations(results: dict) -> dict:
    """results.json but its times: the run's durations, and the seconds (not the epoch and step) to the target."""
    kept = {key: value for key, value in results.items() if key not in DURATIONS}
    if "to_target" in kept:
        kept["to_target"] = {key: value for key, value in kept["to_target"].items() if key != "seconds"}
    return kept


def without_time(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{key: value for key, value in row.items() if key != "time_s"} for row in rows]


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_rows(process: subprocess.Popen, run_dir: Path, count: int) -> None:
    """Until metrics.csv has `count` epoch rows (the epoch's checkpoints are written just after its row)."""
    path = run_dir / "metrics.csv"
    deadline = time.monotonic() + 300
    while not (path.is_file() and len(path.read_text().splitlines()) > count):
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the run never reached its epoch"
        time.sleep(0.01)


def resume(run_dir: Path, *overrides: str, into: Path | None = None) -> subprocess.CompletedProcess:
    """`python train.py [OVERRIDES] ckpt_path=<run_dir>/checkpoints/last.ckpt hydra.run.dir=<into or run_dir>`."""
    ckpt_path = f"ckpt_path={run_dir}/checkpoints/last.ckpt"
    return run_script("train.py", *overrides, ckpt_path, f"hydra.run.dir={into or run_dir}")


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in sorted(run_dir.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    process = run_script("train.py", *SLOW_EPOCHS, f"hydra.run.dir={run_dir}")
    assert process.returncode == 0, process.stderr
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("command", ["ckpt_path alone", "its own command and ckpt_path"])
def test_a_run_killed_after_its_second_epoch_resumes_to_the_uninterrupted_metrics(uninterrupted, tmp_path, command):
    run_dir = tmp_path / "run"
    process = start(run_dir, *SLOW_EPOCHS)
    wait_for_rows(process, run_dir, 2)
    time.sleep(0.05)  # into the third epoch, or still writing the second's checkpoints: any moment must do
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] > 0  # the cadence's

    own = SLOW_EPOCHS if command == "its own command and ckpt_path" else []
    resumed = resume(run_dir, *own)
    assert resumed.returncode == 0, resumed.stderr
    assert without_durations(results_of(run_dir)) == without_durations(results_of(uninterrupted))
    assert without_time(rows_of(run_dir)) == without_time(rows_of(uninterrupted))
    assert (run_dir / "steps.csv").read_text() == (uninterrupted / "steps.csv").read_text()  # no step twice or lost
    for name in ("overrides.yaml", "config.yaml"):  # Hydra rewrote them for the resume command; the run's are back
        assert (run_dir / ".hydra" / name).read_text() == (uninterrupted / ".hydra" / name).read_text()


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "how"), [(signal.SIGTERM, "ckpt_path"), (signal.SIGINT, "same command")])
def test_a_signal_mid_epoch_leaves_an_interrupted_run_that_resumes_exactly(uninterrupted, tmp_path, signum, how):
    run_dir = tmp_path / "run"
    process = start(run_dir, *SLOW_EPOCHS)
    wait_for_rows(process, run_dir, 1)
    time.sleep(0.1)  # into the second epoch
    process.send_signal(signum)
    output = process.communicate(timeout=60)[0]

    assert process.returncode == 128 + signum
    results = results_of(run_dir)
    assert results["status"] == "interrupted" and signal.Signals(signum).name in results["error"]
    assert f"resume with: python train.py ckpt_path={run_dir}/checkpoints/last.ckpt" in output
    assert "Traceback" not in output
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] % 1077 != 0  # written where the signal stopped it, not at an epoch's end

    if how == "ckpt_path":
        resumed = resume(run_dir)
    else:  # as a requeued SLURM job does: the same command, in the same folder
        resumed = run_script("train.py", *SLOW_EPOCHS, f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert without_durations(results_of(run_dir)) == without_durations(results_of(uninterrupted))
    assert without_time(rows_of(run_dir)) == without_time(rows_of(uninterrupted))


@pytest.mark.slow
def test_a_streamed_run_stopped_mid_epoch_resumes_exactly(tmp_path):
    streamed = [
        *SLOW_EPOCHS,
        "data=synthetic",
        "data.n_samples=1500",
        "data.image_size=8",
        "data.batch_size=1",
        "data.stream.in_memory_mb=0",
        f"data.dir={tmp_path}/data",
    ]
    whole = run_script("train.py", *streamed, f"hydra.run.dir={tmp_path}/whole")
    assert whole.returncode == 0, whole.stderr
    assert "streamed" in whole.stdout + whole.stderr
    run_dir = tmp_path / "run"
    process = start(run_dir, *streamed)
    wait_for_rows(process, run_dir, 1)
    time.sleep(0.1)  # into the second epoch
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] % 900 != 0
    assert resume(run_dir).returncode == 0
    assert without_durations(results_of(run_dir)) == without_durations(results_of(tmp_path / "whole"))
    assert without_time(rows_of(run_dir)) == without_time(rows_of(tmp_path / "whole"))


def test_on_slurm_only_one_requeue_mechanism_is_armed(monkeypatch):
    from lightning_fabric.plugins.environments import SLURMEnvironment

    assert not any(isinstance(plugin, SLURMEnvironment) for plugin in plugins())
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    (environment,) = [plugin for plugin in plugins() if isinstance(plugin, SLURMEnvironment)]
    assert environment.auto_requeue is False  # submitit's launcher requeues; Lightning's must not too


def test_a_resume_refuses_overrides_that_would_make_it_another_run(uninterrupted, tmp_path):
    process = resume(uninterrupted, *SLOW_EPOCHS, "optimizer.lr=0.5", "seed=3", into=tmp_path)
    assert process.returncode == 2
    (line,) = [line for line in (process.stdout + process.stderr).splitlines() if "[ERROR]" in line]
    assert "a resume continues the run of its checkpoint" in line and "differ from it: optimizer.lr, seed (" in line
    assert "Traceback" not in process.stderr
    shorter = resume(uninterrupted, *SLOW_EPOCHS, "trainer.max_epochs=2", into=tmp_path)
    assert shorter.returncode == 2 and "trainer.max_epochs=2 is not allowed" in shorter.stdout + shorter.stderr


EXTENDED = [*SMALL, "optimizer.lr=0.05"]  # its second epoch validates worse than its first


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("two_epochs") / "run"
    process = run_script("train.py", *EXTENDED, f"hydra.run.dir={run_dir}")
    assert process.returncode == 0, process.stderr
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["its own", "a new one"])
def test_a_finished_run_trained_longer_ends_where_an_uninterrupted_run_ends(two_epochs, tmp_path, folder):
    one_epoch = tmp_path / "one"
    process = run_script("train.py", *EXTENDED, "trainer.max_epochs=1", f"hydra.run.dir={one_epoch}")
    assert process.returncode == 0, process.stderr
    with open(one_epoch / "steps.csv", "a") as steps:
        steps.write("1,35,0.5\n1,3")  # what a kill after steps.csv's write and before last.ckpt's leaves
    before = files_of(one_epoch)
    run_dir = one_epoch if folder == "its own" else tmp_path / "new"

    extended = resume(one_epoch, *EXTENDED, into=run_dir)
    assert extended.returncode == 0, extended.stderr
    results = results_of(run_dir)
    assert results["extended_from"] == 1 and results["epochs"] == 2
    assert without_durations(results) == without_durations(results_of(two_epochs)) | {"extended_from": 1}
    assert results["best_epoch"] == 0  # the earlier part's best.ckpt, kept: Lightning's best score came along
    assert without_time(rows_of(run_dir)) == without_time(rows_of(two_epochs))
    assert (run_dir / "steps.csv").read_text() == (two_epochs / "steps.csv").read_text()
    assert (run_dir / "checkpoints" / "best.ckpt").read_bytes() == (
        two_epochs / "checkpoints" / "best.ckpt"
    ).read_bytes()
    states = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"].values()
    assert all(str(run_dir) in state["dirpath"] for state in states if "dirpath" in state)
    if folder == "a new one":
        assert files_of(one_epoch) == before  # the earlier folder is only read


@pytest.mark.slow
def test_a_checkpoint_of_a_mid_epoch_validation_resumes_exactly(tmp_path):
    mid_epoch = [*SMALL, "+trainer.val_check_interval=0.5"]
    whole = run_script("train.py", *mid_epoch, f"hydra.run.dir={tmp_path}/whole")
    assert whole.returncode == 0, whole.stderr
    run_dir = tmp_path / "run"
    stopped = run_script("train.py", *mid_epoch, "+trainer.max_steps=17", f"hydra.run.dir={run_dir}")
    assert stopped.returncode == 0, stopped.stderr
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (0, 17)  # written at the validation half-way through epoch 0

    resumed = resume(run_dir, *mid_epoch)  # max_steps may change: it only says when training stops
    assert resumed.returncode == 0, resumed.stderr
    assert without_durations(results_of(run_dir)) == without_durations(results_of(tmp_path / "whole"))
    assert without_time(rows_of(run_dir)) == without_time(rows_of(tmp_path / "whole"))
    assert (run_dir / "steps.csv").read_text() == (tmp_path / "whole" / "steps.csv").read_text()


@pytest.mark.slow
def test_the_same_seed_gives_the_same_metrics_and_another_seed_others(train, tmp_path):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        process, run_dir = train(*SMALL, f"seed={seed}", run_dir=tmp_path / name)
        assert process.returncode == 0, process.stderr
        runs[name] = results_of(run_dir)
    assert runs["a"]["metrics"] == runs["b"]["metrics"]
    assert runs["a"]["metrics"] != runs["c"]["metrics"]
    assert without_time(rows_of(tmp_path / "a")) == without_time(rows_of(tmp_path / "b"))


def test_a_diverging_run_stops_at_once_says_so_once_and_exits_0(train):
    process, run_dir = train("optimizer=sgd", "optimizer.lr=1e8", "trainer.max_epochs=3")
    assert process.returncode == 0, process.stderr
    results = results_of(run_dir)
    assert results["status"] == "diverged"
    assert results["epochs"] == 1 and results["steps"] < 34  # stopped inside the first epoch
    output = process.stdout + process.stderr
    assert len([line for line in output.splitlines() if "diverged:" in line and "WARNING" in line]) == 1
    assert "returned `None`" not in output and "Traceback" not in output


def test_a_fused_optimizer_skips_the_non_finite_step_on_the_device_and_the_run_stops_soon_after(train, tmp_path):
    # Adam at lr 1e30: its first step sends the weights to ~1e30, so the loss of step 1 is not finite; the flag is
    # read 16 batches later, every step between is skipped by the fused kernel, and none of them is counted
    diverging = ("optimizer=adam", "optimizer.lr=1e30", "trainer.max_epochs=2", "callbacks.progress_bar=null")
    process, run_dir = train(*diverging, run_dir=tmp_path / "diverged")
    assert process.returncode == 0, process.stderr
    results = results_of(run_dir)
    assert results["status"] == "diverged" and results["steps"] == 2  # steps 0 and 1, the skipped one counted
    assert "at step 1;" in process.stdout + process.stderr
    assert [row["step"] for row in rows_of(run_dir)] == ["2"]
    assert (run_dir / "steps.csv").read_text().splitlines()[1:][-1].startswith("0,1,")  # step 0's loss, alone
    assert len((run_dir / "steps.csv").read_text().splitlines()) == 2

    process, one_dir = train(*diverging, "+trainer.max_steps=1", run_dir=tmp_path / "one")
    assert process.returncode == 0, process.stderr
    kept, after_one = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (run_dir, one_dir))
    assert after_one["global_step"] == 1  # max_steps stops mid-epoch: last.ckpt is written at that batch
    weights = [key for key in after_one["state_dict"] if key.endswith(("weight", "bias"))]
    assert weights and all(torch.equal(kept["state_dict"][key], after_one["state_dict"][key]) for key in weights)
    adam_steps = [state["step"].item() for state in kept["optimizer_states"][0]["state"].values()]
    assert adam_steps and set(adam_steps) == {1.0}  # Adam's own count did not move either


def test_checkpoints_load_with_weights_only_and_last_carries_the_rng_states(train, tmp_path):
    process, run_dir = train(*SMALL)
    assert process.returncode == 0, process.stderr
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    state = last["callbacks"]["descent"]
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert state["config"]["model"]["hidden_dims"] == [16] and state["config"]["ckpt_path"] is None
    assert "model.hidden_dims=[16]" in state["overrides"]
    assert last["optimizer_states"] and isinstance(last["hyper_parameters"]["optimizer"], dict)
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert "optimizer_states" not in best and "callbacks" not in best  # the weights, for test() and eval.py
    assert (
        best["state_dict"].keys() == last["state_dict"].keys() and best["hyper_parameters"] == last["hyper_parameters"]
    )

    resumed = run_script("train.py", f"ckpt_path={run_dir}/checkpoints/best.ckpt", f"hydra.run.dir={tmp_path}")
    assert (
        resumed.returncode == 2 and "best.ckpt holds the best epoch's weights only" in resumed.stdout + resumed.stderr
    )


def test_best_ckpt_holds_only_tensors_and_loads_as_the_tested_model(train):
    from omegaconf import OmegaConf

    from descent.data.sources import build_source
    from descent.model import Classifier

    process, run_dir = train(*SMALL)
    assert process.returncode == 0, process.stderr
    best = run_dir / "checkpoints" / "best.ckpt"
    state_dict = torch.load(best, weights_only=True)["state_dict"]
    assert state_dict and all(isinstance(value, torch.Tensor) for value in state_dict.values())

    model = Classifier.load_from_checkpoint(best, map_location="cpu").eval()
    source = build_source(OmegaConf.load(run_dir / ".hydra" / "config.yaml").data)
    test = np.load(run_dir / "split.npz")["test"]
    with torch.no_grad():
        predicted = model(torch.as_tensor(np.asarray(source.images[test], dtype=np.float32))).argmax(dim=1)
    correct = int((predicted == torch.as_tensor(source.labels[test])).sum())
    assert correct == round(results_of(run_dir)["metrics"]["test/acc"] * len(test))


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    torch.save(rng_states(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    drawn = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(drawn[0], expected[0]) and np.array_equal(drawn[1], expected[1]) and drawn[2] == expected[2]


@pytest.mark.parametrize("writer", [AtomicCheckpointIO, BackgroundCheckpointIO])
def test_a_failed_checkpoint_write_leaves_the_previous_file_whole(tmp_path, monkeypatch, writer):
    path = tmp_path / "last.ckpt"
    io = writer()
    io.save_checkpoint({"epoch": 1}, path)
    io.teardown()

    def killed(fd):  # the new bytes are in the temporary file; the kill comes before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2}, path)
        io.teardown()  # the background writer raises its thread's error here
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_checkpoints_get_the_mode_of_any_new_file(tmp_path):
    (tmp_path / "plain").write_bytes(b"")
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").stat().st_mode == (tmp_path / "plain").stat().st_mode  # not mkstemp's 0600


def test_background_writes_land_in_order_before_a_load(tmp_path):
    io = BackgroundCheckpointIO()
    state = {"weights": torch.zeros(1000)}
    for epoch in range(5):
        state["weights"].fill_(epoch)  # training changes the tensors in place right after each save
        io.save_checkpoint({**state, "epoch": epoch}, tmp_path / "last.ckpt")
        io.save_checkpoint({"epoch": epoch}, tmp_path / f"e{epoch}.ckpt")
        io.remove_checkpoint(tmp_path / f"e{epoch}.ckpt")
    loaded = io.load_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert loaded["epoch"] == 4 and torch.equal(loaded["weights"], torch.full((1000,), 4.0))
    io.save_checkpoint({"epoch": 5}, tmp_path / "last.ckpt")
    io.teardown()
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"epoch": 5}


def test_weights_only_checkpoints_wait_in_memory_until_a_full_one_or_the_end(tmp_path):
    io = BackgroundCheckpointIO()
    weights = {"net.weight": torch.zeros(3)}
    io.save_checkpoint({"state_dict": weights, "epoch": 0}, tmp_path / "best.ckpt")
    weights["net.weight"].fill_(7.0)  # training goes on: the kept copy must not move with it
    io.wait()
    assert not (tmp_path / "best.ckpt").exists()  # an improvement is not a file write
    kept = io.load_checkpoint(tmp_path / "best.ckpt", weights_only=True)  # the test reads it from memory
    assert kept["epoch"] == 0 and torch.equal(kept["state_dict"]["net.weight"], torch.zeros(3))

    io.save_checkpoint({"state_dict": weights, "epoch": 1}, tmp_path / "best.ckpt")
    io.save_checkpoint({"state_dict": weights, "optimizer_states": [], "epoch": 1}, tmp_path / "last.ckpt")
    io.wait()  # a full checkpoint takes the kept best with it, written first: the two files agree
    on_disk = torch.load(tmp_path / "best.ckpt", weights_only=True)
    assert on_disk["epoch"] == 1 and torch.equal(on_disk["state_dict"]["net.weight"], torch.full((3,), 7.0))

    io.save_checkpoint({"state_dict": {"net.weight": torch.ones(3)}, "epoch": 2}, tmp_path / "best.ckpt")
    io.save_checkpoint({"state_dict": weights, "epoch": 2}, tmp_path / "other.ckpt")
    io.remove_checkpoint(tmp_path / "other.ckpt")
    io.teardown()  # the end of fit or test writes what is kept
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["epoch"] == 2
    assert sorted(os.listdir(tmp_path)) == ["best.ckpt", "last.ckpt"]


@pytest.mark.parametrize("kind", ["in memory", "streamed"])
def test_a_loader_restored_mid_epoch_serves_the_batches_not_yet_seen(kind):
    images, labels = torch.arange(20.0).reshape(10, 2), torch.arange(10)

    def loader() -> TensorBatches | StreamingBatches:
        if kind == "in memory":
            return TensorBatches(images, labels, batch_size=2, shuffle=True, seed=3)
        return StreamingBatches(images.numpy(), labels.numpy(), 2, shuffle=True, seed=3, block_size=4, prefetch=2)

    interrupted = loader()
    interrupted.set_epoch(1)
    batches = iter(interrupted)
    seen = [next(batches)[1] for _ in range(2)]
    batches.close()  # the signal: its prefetch thread stops
    restored = loader()
    restored.load_state_dict(interrupted.state_dict())
    restored.set_epoch(1)
    rest = [batch[1] for batch in restored]
    whole = loader()
    whole.set_epoch(1)
    assert [b.tolist() for b in seen + rest] == [batch[1].tolist() for batch in whole]  # the same batches, in order
    assert len(rest) == 3
    restored.set_epoch(2)
    assert len(list(restored)) == 5  # the next epoch is whole again


LOGGERS = sorted(path.stem for path in (CONF_DIR / "logger").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("logger", LOGGERS)
def test_no_file_of_a_run_folder_holds_a_secret_of_the_environment(tmp_path, monkeypatch, logger):
    secrets = {
        "WANDB_API_KEY": "wandb-planted-3f9a1c7e",
        "HF_TOKEN": "hf-planted-77b2",
        "MY_SERVICE_SECRET": "secret-planted-51d0",
        "DB_PASSWORD": "password-planted-a9e4",
    }
    for name, value in secrets.items():
        monkeypatch.setitem(ENV, name, value)
    run_dir = tmp_path / "run"
    refused = run_script("train.py", *SMALL, "+x=${oc.env:WANDB_API_KEY}", f"hydra.run.dir={tmp_path / 'refused'}")
    assert refused.returncode == 2 and "x='${oc.env:WANDB_API_KEY}' is not allowed" in refused.stdout + refused.stderr
    process = run_script(
        "train.py", *SMALL, f"logger={logger}", "tags=[${oc.env:WANDB_API_KEY}]", f"hydra.run.dir={run_dir}"
    )
    assert process.returncode == 0, process.stderr
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert len(files) >= 7
    for path in files:
        content = path.read_bytes()
        for value in secrets.values():
            assert value.encode() not in content, f"{value} found in {path}"
    for value in secrets.values():
        assert value not in process.stdout + process.stderr + refused.stdout + refused.stderr

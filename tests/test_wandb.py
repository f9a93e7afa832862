"""Loggers through the real train.py: W&B offline (with and without credentials), groups, tensorboard, lists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENV, FAST, ROOT, compose_train, results_of
from wandb.proto import wandb_internal_pb2

from descent import CONF_DIR

BLOCK = 32 * 1024  # LevelDB log blocks
FULL, LAST = 1, 4


def wandb_records(run_file: Path) -> list[wandb_internal_pb2.Record]:
    """The records of an offline run's `run-<id>.wandb`. wandb 0.31 has no Python reader (its sync lives in the Go
    wandb-core), so this reads the LevelDB-log framing: a 7-byte ':W&B' header, then 32 KiB blocks of chunks
    (4-byte checksum, 2-byte length, 1-byte type: FULL, FIRST, MIDDLE, LAST) that join into protobuf Records."""
    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, chunks, position = [], [], 7
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            position += BLOCK - position % BLOCK
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def offline_runs(run_dir: Path) -> list[dict]:
    """Each offline run under `run_dir/wandb`: its run record, history keys, config and summary, read from disk."""
    runs = []
    for run_file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run, history, config, summary = None, set(), {}, {}
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                config |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
            elif kind == "history":
                history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
            elif kind == "config":
                config |= {item.key: json.loads(item.value_json) for item in record.config.update}
            elif kind == "summary":
                summary |= {item.key or "/".join(item.nested_key): item.value_json for item in record.summary.update}
        runs.append({"run": run, "history": history, "config": config, "summary": summary})
    return runs


def run_train(run_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *FAST, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT,
        env=env or ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_is_a_complete_offline_run(run_dir: Path, optimizer_target: str) -> dict:
    (run,) = offline_runs(run_dir)
    assert {"train/loss", "val/acc", "test/acc"} <= run["history"]
    assert any(key.startswith("test/confusion_matrix/") for key in run["history"])  # the logged image
    assert run["config"]["optimizer"]["_target_"] == optimizer_target
    assert json.loads(run["summary"]["best/val/acc"]) == pytest.approx(results_of(run_dir)["metrics"]["val/acc"])
    return run


def test_offline_wandb_run_lives_under_the_run_folder_with_history_config_and_identity(tmp_path):
    run_dir = tmp_path / "run"
    process = run_train(run_dir, "logger=wandb", "optimizer=sgd")
    assert process.returncode == 0, process.stderr
    run = assert_is_a_complete_offline_run(run_dir, "torch.optim.SGD")["run"]
    assert run.job_type == "train" and run.run_group == ""  # a single run belongs to no group
    assert {"optimizer=sgd", "batch_size=32"} <= set(run.tags)
    assert "optimizer=sgd" in run.display_name
    assert f"wandb sync {run_dir}/wandb/offline-run-" in process.stderr + process.stdout


def test_without_credentials_or_stdin_wandb_runs_offline_by_itself(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in ENV.items() if not key.startswith("WANDB_")} | {"HOME": str(home)}
    env.pop("NETRC", None)
    process = run_train(tmp_path / "run", "logger=wandb", env=env)
    assert process.returncode == 0, process.stderr
    assert "no credentials found" in process.stderr + process.stdout
    assert_is_a_complete_offline_run(tmp_path / "run", "torch.optim.Adam")


EMPTY = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "RANK", "LOCAL_RANK")


def test_empty_environment_variables_are_unset_so_wandb_runs_offline_as_without_them(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in ENV.items() if not key.startswith("WANDB_")} | {"HOME": str(home)}
    env |= dict.fromkeys((*EMPTY, "SLURM_NTASKS"), "")  # as shells, CI files and containers pass unset variables
    env.pop("NETRC", None)
    process = run_train(tmp_path / "run", "logger=wandb", env=env)
    output = process.stdout + process.stderr
    assert process.returncode == 0, output
    assert "no credentials found" in output and "Traceback" not in output and "libgomp" not in output
    assert_is_a_complete_offline_run(tmp_path / "run", "torch.optim.Adam")


def test_a_wandb_setting_wandb_refuses_is_one_line_naming_it(tmp_path):
    process = run_train(tmp_path / "run", "logger=wandb", env={**ENV, "WANDB_MODE": "bogus"})
    output = process.stdout + process.stderr
    assert process.returncode == 2 and "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "[ERROR]" in line]
    assert "WANDB_MODE='bogus' is not allowed: " in line and "'offline'" in line


def test_the_api_key_is_never_written_to_the_run_folder(tmp_path):
    key = "plantedkey" + "0123456789abcdef" * 2 + "abcdefghijkl"
    run_dir = tmp_path / "run"
    process = run_train(run_dir, "logger=[csv,wandb,tensorboard]", env={**ENV, "WANDB_API_KEY": key})
    assert process.returncode == 0, process.stderr
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert any(path.suffix == ".wandb" for path in files) and any("tfevents" in path.name for path in files)
    assert [path for path in files if key.encode() in path.read_bytes()] == []
    assert key not in process.stdout + process.stderr


def test_eval_logs_a_wandb_run_of_job_type_eval_grouped_with_its_run(tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(run_dir).returncode == 0
    eval_dir = tmp_path / "eval"
    process = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            f"ckpt_path={run_dir}/checkpoints/best.ckpt",
            "logger=wandb",
            f"hydra.run.dir={eval_dir}",
        ],
        cwd=ROOT,
        env=ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr
    (run,) = offline_runs(eval_dir)
    assert run["run"].job_type == "eval" and run["run"].run_group == "run"
    assert "test/acc" in run["history"] and (eval_dir / "confusion_matrix.png").is_file()


@pytest.mark.slow
def test_sweep_jobs_are_separate_wandb_runs_in_one_group(tmp_path):
    sweep_dir = tmp_path / "sweep"
    process = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            *FAST,
            "trainer.max_epochs=1",
            "logger=wandb",
            "optimizer=sgd,adam",
            "seed=1,2",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=ROOT,
        env=ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr
    runs = [offline_runs(sweep_dir / job) for job in ("0", "1", "2", "3")]
    assert [len(job_runs) for job_runs in runs] == [1, 1, 1, 1]  # finished after each job: none reused the last
    (sgd,), (sgd_2,), (adam,), _ = runs
    assert sgd["run"].run_id != adam["run"].run_id
    assert sgd["run"].run_group == adam["run"].run_group == sweep_dir.name
    assert sgd["config"]["optimizer"]["_target_"] == "torch.optim.SGD"
    assert adam["config"]["optimizer"]["_target_"] == "torch.optim.Adam"
    # the replicates of one setting share it in their config (dashboards group by it), whatever their seed
    assert sgd["config"]["setting"] == sgd_2["config"]["setting"] != adam["config"]["setting"]
    assert "seed" not in sgd["config"]["setting"] and "optimizer=sgd" in sgd["config"]["setting"]
    (settings,) = offline_runs(sweep_dir)  # the sweep's settings table, a W&B table in the sweep's group
    assert settings["run"].job_type == "settings" and settings["run"].run_group == sweep_dir.name
    assert "settings/_type" in settings["history"]  # logged as a wandb.Table


FIT_PRELUDE = """
import json, sys
from pathlib import Path
from hydra import compose, initialize_config_dir
from descent.data.sources import build_source
from descent.data.splits import train_val_test
from descent.train import fit_and_test

conf_dir, common = sys.argv[1], json.loads(sys.argv[2])

def fit(folder, *overrides, **kwargs):
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*common, *overrides])
    source = build_source(cfg.data)
    split = train_val_test(source.labels, tuple(cfg.data.split), cfg.seed)
    return fit_and_test(cfg, source, split, Path(folder), **kwargs)
"""


def fit_in_one_process(body: str) -> subprocess.CompletedProcess:
    """Several fit_and_test calls in one process, as the CV loop makes them."""
    common = json.dumps([*FAST, "trainer.max_epochs=1", "logger=wandb"])
    return subprocess.run(
        [sys.executable, "-c", FIT_PRELUDE + body, str(CONF_DIR), common],
        cwd=ROOT,
        env=ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_folds_of_a_cv_run_share_one_group(tmp_path):
    cv_dir = tmp_path / "cv-run"
    process = run_train(cv_dir, "cv.folds=2", "logger=wandb")
    assert process.returncode == 0, process.stderr
    folds = [offline_runs(cv_dir / f"fold_{fold}") for fold in range(2)]
    assert [len(fold_runs) for fold_runs in folds] == [1, 1]
    runs = [fold_runs[0]["run"] for fold_runs in folds]
    assert {run.run_group for run in runs} == {"cv-run"} and {run.job_type for run in runs} == {"fold"}
    assert runs[0].run_id != runs[1].run_id and runs[0].display_name != runs[1].display_name


@pytest.mark.slow
def test_a_resumed_run_goes_on_in_its_own_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(run_dir, "logger=wandb").returncode == 0
    resume = [f"ckpt_path={run_dir}/checkpoints/last.ckpt", f"hydra.run.dir={run_dir}"]
    resumed = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *resume],
        cwd=ROOT,
        env=ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    first, second = offline_runs(run_dir)
    assert first["run"].run_id == second["run"].run_id  # one W&B run, written in two sessions
    assert "W&B: resuming run" in resumed.stderr + resumed.stdout


@pytest.mark.slow
def test_a_run_that_fails_in_fit_is_finished_with_exit_code_1_and_the_next_run_is_a_new_one(tmp_path):
    process = fit_in_one_process(
        f"try: fit('{tmp_path}/failed', 'optimizer._target_=builtins.int')  # raises in configure_optimizers\n"
        "except TypeError: pass\n"
        f"fit('{tmp_path}/next')"
    )
    assert process.returncode == 0, process.stderr
    (failed_file,) = (tmp_path / "failed" / "wandb").glob("offline-run-*/run-*.wandb")
    exits = [record.exit for record in wandb_records(failed_file) if record.WhichOneof("record_type") == "exit"]
    assert [record.exit_code for record in exits] == [1]
    (next_run,) = offline_runs(tmp_path / "next")  # not merged into the failed run, which was left finished
    assert {"train/loss", "val/acc"} <= next_run["history"]


@pytest.mark.parametrize(
    ("choice", "loggers"),
    [
        ("logger=csv", ["csv"]),
        ("logger=[csv,wandb]", ["csv", "wandb"]),
        ("logger=[csv,wandb,tensorboard]", ["csv", "wandb", "tensorboard"]),
        ("logger=none", []),
        ("logger=[]", []),
        ("logger=[csv,none]", ["csv"]),
    ],
)
def test_logger_choices_and_lists_select_those_loggers(choice, loggers):
    assert list(compose_train(choice).logger) == loggers


def test_wandb_mode_is_never_guessed_when_set(monkeypatch):
    from descent.loggers import wandb_mode

    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(None) is None  # wandb reads WANDB_MODE itself

"""Shared helpers: run the real train.py / eval.py through Hydra in a process of their own, with one torch thread
(forked from a server that has imported torch and Lightning once: tests/forked.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import forked
import pytest
from hydra import compose, initialize_config_dir

from descent import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
# one thread per process: two 2-thread torch processes on 2 cores slow a tiny MLP ~200 times (measured)
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HYDRA_FULL_ERROR": "0",
    "WANDB_MODE": "offline",
}
FAST = ["trainer.max_epochs=2", "callbacks.progress_bar=null"]


IN_SUBPROCESS = os.environ.get("DESCENT_TESTS_IN_SUBPROCESS") == "1"  # every script a plain `python SCRIPT`


def run_script(script: str, *overrides: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python SCRIPT OVERRIDES` in `cwd` with ENV, as a process of its own; its exit code, stdout and stderr."""
    if not IN_SUBPROCESS:
        return forked.run(ROOT / script, list(overrides), cwd, ENV, timeout=600)
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def results_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture
def train(tmp_path: Path):
    """Run train.py into tmp_path/run with the fast overrides; returns (process, run folder)."""

    def _train(*overrides: str, run_dir: Path | None = None) -> tuple[subprocess.CompletedProcess, Path]:
        run_dir = run_dir or tmp_path / "run"
        process = run_script("train.py", *FAST, f"hydra.run.dir={run_dir}", *overrides)
        return process, run_dir

    return _train


def compose_train(*overrides: str):
    """The composed train config, as train.py would see it (no Hydra run)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))

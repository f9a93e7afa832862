"""`python scripts/bench.py --sweep`: the same 4-job sweep with the joblib launcher and with the basic one, and the
fixed cost of a job (all but its epochs).

Each sweep is a real `python train.py -m ...` in a subprocess, timed from start to exit, so the joblib figure pays
for its worker processes' start and imports as a user would. The fixed cost of a job comes from the basic sweep's
own results: a job's duration_s less its training seconds (the last time_s of metrics.csv). joblib pays a fixed
price the basic launcher does not (its workers start, import torch and Lightning, and shut down: several seconds),
so its jobs here are long enough (400 epochs, ~20 s on a quiet 2-core machine) for the parallel part to dominate,
as in a real sweep. Timings on a shared machine are noisy: compare them on a quiet one.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOBS = "seed=1,2,3,4"


def run_sweep(sweep_dir: Path, launcher: str, epochs: int) -> float:
    """Wall seconds of one 4-job sweep from process start to exit."""
    command = [
        *(
            sys.executable,
            "-m",
            "descent.train",
            "-m",
            JOBS,
            f"hydra/launcher={launcher}",
            f"hydra.sweep.dir={sweep_dir}",
        ),
        *(
            f"trainer.max_epochs={epochs}",
            "callbacks.early_stopping=null",
            "callbacks.progress_bar=null",
            "logger=none",
        ),
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def job_costs(sweep_dir: Path) -> list[tuple[float, float]]:
    """(duration_s, training seconds) of each job of a sweep folder, in job order."""
    costs = []
    for job in sorted((folder for folder in sweep_dir.iterdir() if folder.name.isdigit()), key=lambda f: int(f.name)):
        duration = json.loads((job / "results.json").read_text())["duration_s"]
        with open(job / "metrics.csv") as file:
            training = float(list(csv.DictReader(file))[-1]["time_s"])
        costs.append((duration, training))
    return costs


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py --sweep", description=__doc__)
    parser.add_argument("--epochs", type=int, default=400, help="epochs a job (default 400)")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        walls = {launcher: run_sweep(Path(tmp) / launcher, launcher, args.epochs) for launcher in ("basic", "joblib")}
        costs = job_costs(Path(tmp) / "basic")
    training = sum(seconds for _, seconds in costs)
    fixed = [duration - seconds for duration, seconds in costs]

    table = Table(title=f"4-job sweep ({JOBS}, {args.epochs} epochs a job, digits, batch 32)")
    for column in ("launcher", "wall s", "speed-up"):
        table.add_column(column, justify="right")
    for launcher, wall in walls.items():
        table.add_row(launcher, f"{wall:.1f}", f"{walls['basic'] / wall:.2f}")
    console = Console()
    console.print(table)
    console.print(
        f"fixed cost of a job inside its process (all but its epochs): first {fixed[0]:.2f} s, then median "
        f"{statistics.median(fixed[1:]):.2f} s (warm)"
    )
    console.print(
        f"whole basic sweep less its training: {(walls['basic'] - training) / len(costs):.2f} s a job "
        "(process start and imports included)"
    )
    print(f"joblib speed-up on a 4-job sweep: {walls['basic'] / walls['joblib']:.2f}")

"""Sweeps: the summary of a sweep folder, what a sweep job returns to its sweeper, and which jobs are already done.

The summary (`summary.csv`, `summary.md`, a rich table) has one row per job folder and is built from the jobs'
`results.json` alone, so it is the same whether the sweep ended, was interrupted or is rebuilt later with
`python -m descent.sweep DIR`. `SweepSummary` writes it when a multirun ends (a Hydra callback, in
conf/hydra/default.yaml) and makes the sweep's exit code non-zero if a job failed. This module only reads job
folders and writes the summary files; it never trains nor changes a job's files.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger("descent")

METRICS = ("val/acc", "val/loss", "test/acc", "test/loss", "train/acc", "train/loss")
NUMBERS = ("best_epoch", "epochs", "duration_s", "peak_rss_mb")
DONE = ("ok", "diverged")  # a finished result: a re-run sweep does not run it again


def job_folders(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (those Hydra wrote its .hydra/ into, or a results.json), in job order."""
    folders = [
        folder
        for folder in sweep_dir.iterdir()
        if folder.is_dir() and ((folder / "results.json").is_file() or (folder / ".hydra").is_dir())
    ]
    return sorted(folders, key=lambda folder: (not folder.name.isdigit(), int(folder.name) if folder.name.isdigit()
                                               else 0, folder.name))  # fmt: skip


def _overrides(folder: Path, results: dict[str, Any]) -> list[str]:
    if "overrides" in results:
        return list(results["overrides"])
    overrides_file = folder / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return []
    from omegaconf import OmegaConf

    return list(OmegaConf.load(overrides_file))


def job_row(folder: Path) -> dict[str, Any]:
    """One job's row: its overrides (key -> value), status, best-epoch metrics, epochs, duration and memory.
    A job folder without results.json (a job killed before it could write one) has status `missing`."""
    results_file = folder / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"status": "missing"}
    overrides = dict(override.split("=", 1) for override in _overrides(folder, results) if "=" in override)
    metrics = results.get("metrics") or {}
    return {
        "job": folder.name,
        "overrides": overrides,
        "status": results.get("status", "missing"),
        **{key: metrics.get(key) for key in METRICS},
        **{key: results.get(key) for key in NUMBERS},
        "peak_gpu_mb": results.get("peak_gpu_mb"),  # on a GPU only
        "error": results.get("error"),
    }


def _sort_key(row: dict[str, Any]) -> float:
    value = row["val/acc"]
    return -value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def swept_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The override keys whose value differs between jobs (all of them when there is one job), in command order."""
    keys = list(dict.fromkeys(key for row in rows for key in row["overrides"]))
    varying = [key for key in keys if len({row["overrides"].get(key) for row in rows}) > 1]
    return varying if varying or len(rows) > 1 else keys


def summarize(sweep_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns and the rows of a sweep folder's summary, best val/acc first (jobs without one last)."""
    rows = sorted((job_row(folder) for folder in job_folders(sweep_dir)), key=_sort_key)
    keys = swept_keys(rows)
    columns = ["job", *keys, "status", *METRICS, *NUMBERS]
    if any(row["peak_gpu_mb"] is not None for row in rows):
        columns.append("peak_gpu_mb")
    if any(row["error"] for row in rows):
        columns.append("error")
    return columns, [{**row["overrides"], **row} for row in rows]


def _show(value: Any, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if column in METRICS else f"{value:.4g}"
    text = str(value)
    if text.count(".") == 1 and text.replace(".", "").replace("e-", "").isdigit():
        return f"{float(text):.4g}"  # an override such as Optuna's optimizer.lr=0.00049464081829378
    return text.replace("|", "\\|").replace("\n", " ")


def write_summary(sweep_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Write summary.csv and summary.md into the sweep folder; return the columns and rows."""
    columns, rows = summarize(sweep_dir)
    with open(sweep_dir / "summary.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Sweep {sweep_dir.name}: {len(rows)} jobs, best val/acc first", "", *summary_markdown(columns, rows)]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return columns, rows


def summary_markdown(columns: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """The summary as Markdown lines: the overrides every job shares, then one table row per job. By hand: pandas'
    to_markdown needs `tabulate`, a dependency for six lines."""
    fixed = sorted({f"{key}={value}" for row in rows for key, value in row["overrides"].items() if key not in columns})
    lines = [f"Every job: `{' '.join(fixed)}`", ""] if fixed else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_show(row.get(column), column) for column in columns) + " |" for row in rows]
    return lines


def print_summary(
    sweep_dir: Path, columns: list[str], rows: list[dict[str, Any]], console: Console | None = None
) -> None:
    """The summary as a rich table on `console` (default: the terminal), narrowed to what fits a terminal (the files
    have every column), then each failed job's error on a line of its own: in a column, a long message would squeeze
    the numbers out of an 80-column terminal. A swept key's header breaks after its dots (`model.` over `dropout`),
    where rich would cut it anywhere to fit."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    shown = [column for column in columns if column not in ("val/loss", "test/loss", "train/acc", "train/loss",
                                                            "best_epoch", "peak_rss_mb", "error")]  # fmt: skip
    table = Table(title=f"{sweep_dir}: {len(rows)} jobs, best val/acc first", box=box.SIMPLE_HEAD, show_edge=False)
    styles = {"ok": "green", "diverged": "yellow"}
    for column in shown:
        table.add_column(escape(column.replace(".", ".\n")), overflow="fold")
    for row in rows:
        table.add_row(*(_show(row.get(column), column) for column in shown), style=styles.get(row["status"], "red"))
    console = console or Console()
    console.print(table)
    for row in rows:
        if row.get("error"):
            console.print(f"[red]job {row['job']}[/]: {escape(str(row['error']))}")


class SweepSummary(Callback):
    """Hydra callback: when a multirun ends, write and print its summary; exit 1 if one of its jobs failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Make the folder of an Optuna sqlite study: sqlite cannot, and nothing else has made it yet."""
        storage = config.hydra.sweeper.get("storage")
        if isinstance(storage, str) and storage.startswith("sqlite:///"):
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        columns, rows = write_summary(sweep_dir)
        print_summary(sweep_dir, columns, rows)
        log.info("summary: %s and %s", sweep_dir / "summary.csv", sweep_dir / "summary.md")
        failed = [row["job"] for row in rows if row["status"] == "failed"]
        if failed:
            log.error("%d of %d jobs failed (jobs %s): their error is in their results.json", len(failed),
                      len(rows), ", ".join(failed))  # fmt: skip
            sys.exit(1)


def objective(results: dict[str, Any]) -> float | None:
    """What a sweeper maximizes: the best epoch's val/acc. A diverged job returns 0, the worst accuracy, so that
    Optuna learns to avoid what diverges; a job without a val/acc returns None, which Optuna records as failed (a NaN
    would crash hydra-optuna-sweeper 1.3 with optuna 2.10: it tells the trial FAIL with the NaN as its value)."""
    if results.get("status") == "diverged":
        return 0.0
    value = (results.get("metrics") or {}).get("val/acc")
    return float(value) if value is not None else None


def finished_results(run_dir: Path, overrides: Sequence[str]) -> dict[str, Any] | None:
    """The results.json already in a job's folder if it is a finished result (ok or diverged) of a job with the
    same overrides: the job a re-run sweep skips. A different job's results in that folder are not its own."""
    results_file = run_dir / "results.json"
    if not results_file.is_file():
        return None
    results = json.loads(results_file.read_text())
    ignored = ("skip_done=",)
    same = [o for o in results.get("overrides", []) if not o.startswith(ignored)] == [
        o for o in overrides if not o.startswith(ignored)
    ]
    return results if same and results.get("status") in DONE else None


@contextmanager
def claim_gpu(lock_dir: Path, count: int, poll_s: float = 1.0) -> Iterator[int]:
    """The index of a GPU that no other job of the sweep holds, held until the `with` block ends.

    One lock file a GPU (`flock`, released by the OS even if the job dies), so parallel jobs on one machine take
    different GPUs whatever order they start and end in; with more jobs than GPUs, a job waits for a free one.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(count):
            file = open(lock_dir / f"gpu{index}.lock", "w")  # noqa: SIM115 (held open for the whole job)
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.close()
                continue
            try:
                yield index
            finally:
                file.close()
            return
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> None:
    """`python -m descent.sweep DIR`: (re)write a sweep folder's summary, e.g. of an interrupted sweep."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a sweep folder: logs/train/multiruns/<date>_<time>")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir() or not job_folders(args.sweep_dir):
        parser.exit(2, f"sweep_dir={args.sweep_dir} is not allowed: expected a sweep folder with job folders in it\n")
    columns, rows = write_summary(args.sweep_dir)
    print_summary(args.sweep_dir, columns, rows)


if __name__ == "__main__":
    main()

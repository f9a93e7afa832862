"""A sweep's summary: one row per job folder (summary.csv, summary.md, a rich table), and the Hydra callback that
writes it, with the settings table of descent.compare, when a multirun ends.

Built from the jobs' results.json alone, so it is the same whether the sweep ended, was interrupted or is rebuilt
later with `python -m descent.sweep DIR`. It only reads job folders and writes the summary files; it never trains
nor changes a job's files.
"""

from __future__ import annotations

import csv
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from descent.results import RESULTS, Status, overrides_of, read_results, status_of
from descent.tables import markdown, rich_table

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger("descent")

METRICS = ("val/acc", "val/loss", "test/acc", "test/loss", "train/acc", "train/loss")
NUMBERS = ("best_epoch", "epochs", "duration_s", "peak_rss_mb")
SHOWN = ("val/acc", "test/acc", "epochs", "duration_s")  # the terminal's columns beside the swept keys and status
STYLES = {Status.OK: "green", Status.DIVERGED: "yellow"}


def job_folders(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (those Hydra wrote its .hydra/ into, or a results.json), in job order."""
    folders = [
        folder
        for folder in sweep_dir.iterdir()
        if folder.is_dir() and ((folder / RESULTS).is_file() or (folder / ".hydra").is_dir())
    ]
    return sorted(folders, key=lambda f: (not f.name.isdigit(), int(f.name) if f.name.isdigit() else 0, f.name))


def job_row(folder: Path) -> dict[str, Any]:
    """One job's row: its overrides (key -> value), status, best-epoch metrics, epochs, duration and memory.
    A job folder without results.json (a job killed before it could write one) has status `missing`."""
    results = read_results(folder)
    overrides = dict(item.split("=", 1) for item in overrides_of(folder, results) if "=" in item)
    results = results or {}
    metrics = results.get("metrics") or {}
    return {
        "job": folder.name,
        "overrides": overrides,
        "status": status_of(results or None),
        **{key: metrics.get(key) for key in METRICS},
        **{key: results.get(key) for key in NUMBERS},
        "peak_gpu_mb": results.get("peak_gpu_mb"),  # on a GPU only
        "error": results.get("error"),
    }


def _best_first(row: dict[str, Any]) -> float:
    value = row["val/acc"]
    return -value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def swept_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The override keys whose value differs between jobs (all of them when there is one job), in command order."""
    keys = list(dict.fromkeys(key for row in rows for key in row["overrides"]))
    varying = [key for key in keys if len({row["overrides"].get(key) for row in rows}) > 1]
    return varying if varying or len(rows) > 1 else keys


def summarize(sweep_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns and the rows of a sweep folder's summary, best val/acc first (jobs without one last)."""
    rows = sorted((job_row(folder) for folder in job_folders(sweep_dir)), key=_best_first)
    keys = swept_keys(rows)
    columns = ["job", *keys, "status", *METRICS, *NUMBERS]
    if any(row["peak_gpu_mb"] is not None for row in rows):
        columns.append("peak_gpu_mb")
    if any(row["error"] for row in rows):
        columns.append("error")
    return columns, [{**row["overrides"], **row} for row in rows]


def summary_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """The summary as Markdown: the overrides every job shares, then one table row per job."""
    fixed = sorted({f"{key}={value}" for row in rows for key, value in row["overrides"].items() if key not in columns})
    shared = f"Every job: `{' '.join(fixed)}`\n\n" if fixed else ""
    return shared + markdown(columns, [[row.get(column) for column in columns] for row in rows])


def write_summary(sweep_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Write summary.csv and summary.md into the sweep folder; return the columns and rows."""
    columns, rows = summarize(sweep_dir)
    with open(sweep_dir / "summary.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**row, "status": row["status"].value} for row in rows)
    title = f"# Sweep {sweep_dir.name}: {len(rows)} jobs, best val/acc first\n\n"
    (sweep_dir / "summary.md").write_text(title + summary_markdown(columns, rows) + "\n")
    return columns, rows


def print_summary(
    sweep_dir: Path, columns: list[str], rows: list[dict[str, Any]], console: Console | None = None
) -> None:
    """The summary as a rich table on `console` (default: the terminal), narrowed to what fits a terminal (the files
    have every column), then each failed job's error on a line of its own: in a column, a long message would squeeze
    the numbers out of an 80-column terminal."""
    from rich.console import Console
    from rich.markup import escape

    shown = [column for column in columns if column not in (*METRICS, *NUMBERS, "error") or column in SHOWN]
    table = rich_table(
        f"{sweep_dir}: {len(rows)} jobs, best val/acc first",
        shown,
        [[row.get(column) for column in shown] for row in rows],
        [STYLES.get(row["status"], "red") for row in rows],
    )
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
        failed = [row["job"] for row in rows if row["status"] == Status.FAILED]
        if failed:
            log.error(
                "%d of %d jobs failed (jobs %s): their error is in their results.json",
                len(failed),
                len(rows),
                ", ".join(failed),
            )
            sys.exit(1)

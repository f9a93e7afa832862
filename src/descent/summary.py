"""A sweep's tables: the summary, one row per job folder (summary.csv, summary.md), and the settings, one row per
setting with its replicates' mean, 95% interval and verdict (settings.csv, settings.md, from descent.compare); the
Hydra callback that writes and prints both when a multirun ends.

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

from descent.compare import Replicate, answer, compare, estimate, setting_of
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


# the settings table's metrics: mean, std and 95% interval of each (compare.metric chooses the best)
SETTING_METRICS = ("val/acc", "test/acc", "test/loss", "to_target/seconds", "to_target/steps")


def replicates_of(run_dir: Path, results: dict[str, Any]) -> list[Replicate]:
    """The replicates a finished job folder holds: its folds (a CV run), its `replicates`, or the job itself (its
    seed), each with the metrics the settings table compares; a failed or missing run holds none."""
    setting = setting_of(overrides_of(run_dir, results))

    def metrics(entry: dict[str, Any]) -> dict[str, float | None]:
        target = entry.get("to_target") or {}
        return {
            **(entry.get("metrics") or {}),
            "to_target/seconds": target.get("seconds"),
            "to_target/steps": target.get("step"),
        }

    if "folds" in results:
        return [
            Replicate(setting, fold["fold"], "fold", metrics(fold), fold.get("n_train"), fold.get("n_test"))
            for fold in results["folds"]
            if status_of(fold).finished
        ]
    entries = results.get("replicates") or [results]
    return [Replicate(setting, e["seed"], "seed", metrics(e)) for e in entries if status_of(e).finished and "seed" in e]


def settings_rows(sweep_dir: Path, metric: str, alpha: float) -> list[dict[str, Any]]:
    """The settings of a sweep folder, best first (descent.compare), with a column per swept key."""
    replicates = []
    for folder in job_folders(sweep_dir):
        results = read_results(folder)
        if results is not None and status_of(results).finished:
            replicates += replicates_of(folder, results)
    rows = compare(replicates, metric, alpha, SETTING_METRICS)
    parsed = [dict(item.split("=", 1) for item in row["setting"] if "=" in item) for row in rows]
    keys = swept_keys([{"overrides": overrides} for overrides in parsed]) if len(rows) > 1 else []
    return [{**{key: overrides.get(key) for key in keys}, **row} for row, overrides in zip(rows, parsed, strict=True)]


def settings_columns(rows: list[dict[str, Any]]) -> list[str]:
    """settings.csv's columns: the swept keys, n, mean/std/interval of each metric, the verdict and its p-value."""
    keys = [key for key in rows[0] if key not in ("setting", "label", "n")] if rows else []
    swept = keys[: keys.index(f"{SETTING_METRICS[0]}_mean")] if keys else []
    stats = [f"{m}_{s}" for m in SETTING_METRICS for s in ("mean", "std", "ci_low", "ci_high")]
    reached = [f"{m}_reached" for m in SETTING_METRICS if m.startswith("to_target/")]
    return [*swept, "n", *stats, *reached, "paired_by", "verdict", "p_value"]


def cell_estimate(row: dict[str, Any], metric: str) -> str:
    """A table cell: the mean ± half-width of its 95% interval (the mean alone when there is none)."""
    mean = row[f"{metric}_mean"]
    return "-" if mean is None else estimate(mean, row[f"{metric}_ci_low"], row[f"{metric}_ci_high"])


def settings_table(rows: list[dict[str, Any]], metrics: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """The settings as a table of strings: a setting's label, n, each metric's mean ± 95% half-width, the verdict."""
    columns = ["setting", "n", *(m.replace("to_target/seconds", "s to target") for m in metrics), "verdict", "p"]
    cells = [
        [row["label"], row["n"], *(cell_estimate(row, m) for m in metrics), row["verdict"], row["p_value"]]
        for row in rows
    ]
    return columns, cells


def write_settings(sweep_dir: Path, metric: str = "val/acc", alpha: float = 0.05) -> list[dict[str, Any]]:
    """Write settings.csv and settings.md into the sweep folder (nothing when no job finished); return the rows."""
    rows = settings_rows(sweep_dir, metric, alpha)
    if not rows:
        return rows
    with open(sweep_dir / "settings.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=settings_columns(rows), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# Sweep {sweep_dir.name}: {len(rows)} settings, compared on {metric}",
        "",
        answer(rows, metric),
        "",
        f"Mean ± half-width of the 95% interval over each setting's n replicates (seeds or folds); each setting is "
        f"compared with the best by a paired t-test over matched replicates (Welch's when they do not match), p-values "
        f"adjusted by Holm; `worse` when p < {alpha}, else `tied`.",
        "",
        markdown(*settings_table(rows, SETTING_METRICS[:4])),
    ]
    (sweep_dir / "settings.md").write_text("\n".join(lines) + "\n")
    return rows


def print_settings(rows: list[dict[str, Any]], metric: str, console: Console | None = None) -> None:
    """The settings as a rich table, then the answer in one sentence."""
    from rich.console import Console

    styles = {"best": "bold green", "tied": "green", "worse": "red"}
    columns, cells = settings_table(rows, ("val/acc", "test/acc", "to_target/seconds"))
    console = console or Console()
    verdicts = [styles.get(row["verdict"], "") for row in rows]
    console.print(rich_table(f"settings, compared on {metric}", columns, cells, verdicts))
    console.print(answer(rows, metric))


def log_settings(config: DictConfig, sweep_dir: Path, rows: list[dict[str, Any]]) -> None:
    """With logger=wandb, the settings table as a W&B table too (a run of its own in the sweep's group)."""
    wandb_cfg = (config.get("logger") or {}).get("wandb")
    if wandb_cfg:
        from descent.loggers import log_table

        columns = ["setting", *settings_columns(rows)]
        data = [[row["label"], *(row.get(column) for column in columns[1:])] for row in rows]
        log_table(wandb_cfg, sweep_dir, "settings", columns, data)


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
        metric, alpha = config.compare.metric, config.compare.alpha
        settings = write_settings(sweep_dir, metric, alpha)
        if settings:
            print_settings(settings, metric)
            log_settings(config, sweep_dir, settings)
        log.info("summary: %s, settings: %s", sweep_dir / "summary.md", sweep_dir / "settings.md")
        failed = [row["job"] for row in rows if row["status"] == Status.FAILED]
        if failed:
            log.error(
                "%d of %d jobs failed (jobs %s): their error is in their results.json",
                len(failed),
                len(rows),
                ", ".join(failed),
            )
            sys.exit(1)

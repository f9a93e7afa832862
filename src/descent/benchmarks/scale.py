"""`python scripts/bench.py --scale`: out-of-core training against the same model on in-memory data.

Writes `--n-samples` synthetic images (default: the issue's 4 million 28x28, a 3.1 GB file) in a subprocess,
evicts the file from the page cache (so the run reads the disk, not memory), then runs the real train.py on it,
streamed from the memory-mapped file; then the same model on a smaller synthetic set loaded into memory. One torch
thread each by default (stable on a shared machine, where two threads of one process wait on each other's core).
Reports samples/s of the first epoch (n_train / its `time_s` in metrics.csv: training and validation, after the
in-memory run's loading) and the peak anonymous memory (RssAnon, polled from /proc: what the process really holds;
mapped file pages are RssFile and do not count). The data goes to a temporary folder, deleted afterwards.
Never imported by a training run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from descent import CONF_DIR

POLL_S = 0.05


def rss_kb(pid: int) -> dict[str, int]:
    """RssAnon and RssFile of a process, in kB (Linux's /proc/<pid>/status)."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile"):
                fields[name] = int(value.split()[0])
    return fields


def write_synthetic(overrides: list[str]) -> None:
    """Write the synthetic data set that train.py with these overrides will read (run in a subprocess)."""
    from hydra import compose, initialize_config_dir

    from descent.data.sources import load_synthetic

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        load_synthetic(compose(config_name="train", overrides=overrides).data)


def evict(path: Path) -> None:
    """Drop this file's pages from the page cache (written back first): later reads come from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def watch(command: list[str]) -> dict[str, float]:
    """Run `command`; its wall time and peak RssAnon/RssFile (MB)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = {"RssAnon": 0, "RssFile": 0}

    def watch() -> None:
        while process.poll() is None:
            try:
                for name, value in rss_kb(process.pid).items():
                    peaks[name] = max(peaks[name], value)
            except (OSError, ValueError):
                return
            time.sleep(POLL_S)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, errors = process.communicate()
    watcher.join()
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({process.returncode}):\n{errors[-3000:]}")
    return {
        "wall_s": time.perf_counter() - started,
        "rss_anon_mb": peaks["RssAnon"] / 1024,
        "rss_file_mb": peaks["RssFile"] / 1024,
    }


def train_and_watch(overrides: list[str], run_dir: Path) -> dict[str, float]:
    """Run train.py with `overrides` into `run_dir`: its first epoch's samples/s, test/acc, wall time, peak memory."""
    watched = watch([sys.executable, "-m", "descent.train", *overrides, f"hydra.run.dir={run_dir}"])
    results = json.loads((run_dir / "results.json").read_text())
    with open(run_dir / "metrics.csv") as file:
        first_epoch_s = float(next(csv.DictReader(file))["time_s"])
    return {**watched, "samples_per_s": results["n_train"] / first_epoch_s, "test_acc": results["metrics"]["test/acc"]}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py --scale", description=__doc__)
    parser.add_argument("--n-samples", type=int, default=4_000_000, help="images streamed from disk")
    parser.add_argument("--in-memory-samples", type=int, default=200_000, help="images of the in-memory baseline")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--threads", default="1", help="torch threads of each run (`auto`: train.py's choice)")
    parser.add_argument("--dir", type=Path, default=None, help="where the data is written (default: a temp folder)")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    work = Path(tempfile.mkdtemp(prefix="descent-scale-"))
    data_dir = args.dir or work
    common = [
        "data=synthetic",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}",
        "model.hidden_dims=[64]",
        "trainer.max_epochs=1",
        "callbacks.progress_bar=null",
        f"threads={args.threads}",
    ]
    streamed_data = [*common, f"data.n_samples={args.n_samples}", f"data.dir={data_dir}/streamed"]
    try:
        written = watch(
            [sys.executable, "-c", f"import descent.benchmarks.scale as s; s.write_synthetic({streamed_data})"]
        )
        file_gb = (data_dir / "streamed" / "images.npy").stat().st_size / 1e9
        print(
            f"wrote {args.n_samples:,} images ({file_gb:.2f} GB) in {written['wall_s']:.1f} s, "
            f"peak RssAnon {written['rss_anon_mb']:.0f} MB"
        )
        evict(data_dir / "streamed" / "images.npy")
        streamed = train_and_watch(streamed_data, work / "streamed_run")
        in_memory = train_and_watch(
            [
                *common,
                f"data.n_samples={args.in_memory_samples}",
                f"data.dir={data_dir}/in_memory",
                "data.stream.in_memory_mb=1000000",
            ],
            work / "in_memory_run",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.dir:
            for name in ("streamed", "in_memory"):
                shutil.rmtree(args.dir / name, ignore_errors=True)

    table = Table(
        title=f"out-of-core vs in-memory, {args.image_size}x{args.image_size}, batch {args.batch_size}",
        caption="samples/s: first epoch (train + val); RssAnon, RssFile: peaks",
    )
    for column in ("data", "images", "samples/s", "test/acc", "RssAnon MB", "RssFile MB", "wall s"):
        table.add_column(column, justify="left" if column == "data" else "right")
    for name, n, row in (
        ("streamed", args.n_samples, streamed),
        ("in memory", args.in_memory_samples, in_memory),
    ):
        table.add_row(
            name,
            f"{n:,}",
            f"{row['samples_per_s']:,.0f}",
            f"{row['test_acc']:.4f}",
            f"{row['rss_anon_mb']:,.0f}",
            f"{row['rss_file_mb']:,.0f}",
            f"{row['wall_s']:.1f}",
        )
    Console().print(table)
    print(f"peak RssAnon of the out-of-core run: {streamed['rss_anon_mb']:.0f} MB with a {file_gb:.2f} GB data file")
    print(f"out-of-core throughput: {streamed['samples_per_s'] / in_memory['samples_per_s']:.0%} of in-memory")

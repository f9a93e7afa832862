"""A sweep's jobs (`python train.py -m ...`): each job runs as a run of its own that never stops the sweep, a job
already finished in its folder is skipped, parallel jobs take a GPU each, and the sweeper gets its objective.

`python -m descent.sweep DIR` rebuilds a sweep folder's summary and settings tables (descent.summary).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from descent.config import ConfigError
from descent.results import RESULTS, Status, read_results, status_of, task_overrides

log = logging.getLogger("descent")
NOT_THE_JOB = ("skip_done=",)  # overrides that do not change what a job computes


def in_sweep() -> bool:
    """Whether this process runs a job of a Hydra multirun (-m)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_job(cfg: DictConfig, run: Callable[[DictConfig], dict[str, Any]]) -> float | None:
    """One job of a sweep: `run(cfg)`, without ever raising an error, so that the sweep goes on. A failed job is
    recorded as `failed` in its results.json (by `run`), returns None (a failed trial for Optuna), and makes the
    sweep's exit code non-zero when it ends (descent.summary.SweepSummary). A job whose folder already holds its
    finished results (a sweep re-run into the same hydra.sweep.dir) is skipped unless skip_done=false. Ctrl-C stops
    the whole sweep."""
    from descent.summary import write_summary

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    done = finished_results(run_dir, task_overrides()) if cfg.get("skip_done") is True else None
    if done is not None:
        log.info("skipped: %s says %s already (skip_done=false runs it again)", run_dir / RESULTS, done["status"])
        return objective(done)
    try:
        with one_gpu_per_job(cfg, Path(hydra_cfg.sweep.dir)):
            return objective(run(cfg))
    except ConfigError as error:
        log.error("%s", error)
    except Exception:
        log.exception("the job failed (recorded in %s); the sweep goes on", run_dir / RESULTS)
    except BaseException:  # Ctrl-C or a signal: the whole sweep stops here
        write_summary(Path(hydra_cfg.sweep.dir))
        log.warning(
            "sweep stopped: its summary so far is in %s; the same command with hydra.sweep.dir=%s finishes it "
            "(finished jobs are skipped)",
            hydra_cfg.sweep.dir,
            hydra_cfg.sweep.dir,
        )
        raise
    return None


def objective(results: dict[str, Any]) -> float | None:
    """What a sweeper maximizes: the best epoch's val/acc. A diverged job returns 0, the worst accuracy, so that
    Optuna learns to avoid what diverges; a job without a val/acc returns None, which Optuna records as failed (a NaN
    would crash hydra-optuna-sweeper 1.3 with optuna 2.10: it tells the trial FAIL with the NaN as its value)."""
    if status_of(results) == Status.DIVERGED:
        return 0.0
    value = (results.get("metrics") or {}).get("val/acc")
    return float(value) if value is not None else None


def finished_results(run_dir: Path, overrides: Sequence[str]) -> dict[str, Any] | None:
    """The results.json already in a job's folder if it is a finished result (ok or diverged) of a job with the
    same overrides: the job a re-run sweep skips. A different job's results in that folder are not its own."""
    results = read_results(run_dir)
    if results is None:
        return None

    def job(items: Sequence[str]) -> list[str]:
        return [item for item in items if not item.startswith(NOT_THE_JOB)]

    same = job(results.get("overrides", [])) == job(overrides)
    return results if same and status_of(results).finished else None


@contextlib.contextmanager
def one_gpu_per_job(cfg: DictConfig, sweep_dir: Path) -> Iterator[None]:
    """Parallel single-GPU jobs (hydra/launcher=joblib) on a machine with several GPUs each take a GPU of their own
    (trainer.devices=[i]) for as long as they run; anywhere else, nothing changes."""
    import torch

    gpus = torch.cuda.device_count()
    parallel = "joblib" in str(HydraConfig.get().launcher.get("_target_", ""))
    if not (parallel and gpus > 1 and cfg.trainer.get("devices") == 1 and cfg.trainer.get("accelerator") != "cpu"):
        yield
        return
    with claim_gpu(sweep_dir / ".gpus", gpus) as index, open_dict(cfg):
        cfg.trainer.devices = [index]
        log.info("this job runs on GPU %d of %d", index, gpus)
        yield


@contextlib.contextmanager
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
    """`python -m descent.sweep DIR`: (re)write a sweep folder's summary and settings, e.g. of an interrupted sweep."""
    from descent.config import COMPARE
    from descent.summary import job_folders, print_settings, print_summary, write_settings, write_summary

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a sweep folder: logs/train/multiruns/<date>_<time>")
    parser.add_argument("--metric", default=None, help="compare.metric (default: the sweep's own, else val/acc)")
    parser.add_argument("--alpha", type=float, default=None, help="compare.alpha (default: the sweep's own, else 0.05)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir() or not job_folders(args.sweep_dir):
        parser.exit(2, f"sweep_dir={args.sweep_dir} is not allowed: expected a sweep folder with job folders in it\n")
    own = sweep_compare(job_folders(args.sweep_dir))
    metric, alpha = args.metric or own.get("metric", "val/acc"), args.alpha or own.get("alpha", 0.05)
    for key, value in (("metric", metric), ("alpha", alpha)):
        if not COMPARE[key].ok(value):
            parser.exit(2, f"--{key}={value} is not allowed: {COMPARE[key].allowed}\n")
    columns, rows = write_summary(args.sweep_dir)
    print_summary(args.sweep_dir, columns, rows)
    settings = write_settings(args.sweep_dir, metric, alpha)
    if settings:
        print_settings(settings, metric)


def sweep_compare(job_dirs: Sequence[Path]) -> dict[str, Any]:
    """The `compare` settings of a sweep's jobs (their .hydra/config.yaml), or none."""
    from omegaconf import OmegaConf

    for job_dir in job_dirs:
        path = job_dir / ".hydra" / "config.yaml"
        if path.is_file():
            return dict(OmegaConf.load(path).get("compare") or {})
    return {}


if __name__ == "__main__":
    main()

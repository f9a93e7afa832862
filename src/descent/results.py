"""results.json, the run's answer: its schema (the statuses), the one writer and the one reader, and the overrides
that made a run folder. Everything that reads run folders (sweeps, comparisons, reports) goes through here."""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from descent.files import write_atomically

RESULTS = "results.json"


class Status(str, Enum):
    """How a run ended (`status` in results.json); a folder without results.json is `missing`."""

    OK = "ok"
    DIVERGED = "diverged"  # the loss became NaN or infinite: a result, not a failure
    INTERRUPTED = "interrupted"  # a signal: last.ckpt is written, the run can be resumed
    FAILED = "failed"  # with `error`
    MISSING = "missing"

    @property
    def finished(self) -> bool:
        """A result a sweep keeps (and a re-run skips): ok or diverged."""
        return self in (Status.OK, Status.DIVERGED)


def status_of(results: dict[str, Any] | None) -> Status:
    return Status(results.get("status", Status.MISSING)) if results is not None else Status.MISSING


def _finite(value: Any) -> Any:
    """JSON has no NaN: a diverged metric is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(path: Path, content: dict[str, Any]) -> Path:
    """Write `content` as JSON (NaN as null), atomically: a reader never sees half a file."""
    write_atomically(path, (json.dumps(_finite(content), indent=2) + "\n").encode())
    return path


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    """Write `run_dir/results.json`."""
    return write_json(run_dir / RESULTS, results)


def read_results(run_dir: Path) -> dict[str, Any] | None:
    """`run_dir/results.json`, or None when the folder has none."""
    path = run_dir / RESULTS
    return json.loads(path.read_text()) if path.is_file() else None


def overrides_of(run_dir: Path, results: dict[str, Any] | None = None) -> list[str]:
    """The overrides that made a run folder, as typed: results.json's (the run's own, also after a resume), else
    Hydra's `.hydra/overrides.yaml`, else none."""
    results = read_results(run_dir) if results is None else results
    if results is not None and "overrides" in results:
        return [str(item) for item in results["overrides"]]
    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(item) for item in OmegaConf.load(path)] if path.is_file() else []


def task_overrides() -> list[str]:
    """The command line's overrides as typed. Iterating Hydra's list would resolve them: `+x=${oc.env:KEY}` would
    come out holding the secret's value."""
    from hydra.core.hydra_config import HydraConfig

    return OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)


def peak_rss_mb() -> float:
    """The process's peak resident memory in MB (Linux reports kilobytes)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_gpu_mb() -> float | None:
    """The peak GPU memory torch allocated in this process, in MB; None without a GPU in use."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def is_rank_zero() -> bool:
    """False in the other processes of a DDP run, which must not write the run's files a second time."""
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


@contextlib.contextmanager
def recorded(run_dir: Path, results: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Write `results` to run_dir/results.json whatever happens inside: what the run adds (status ok or diverged),
    or `failed`/`interrupted` with the error; then the duration and peak memory. Rank 0 writes it."""
    from descent.config import ConfigError
    from descent.resume import Interrupted

    started = time.perf_counter()
    try:
        yield results
    except Interrupted as stop:  # SIGTERM/SIGINT: last.ckpt is written; the process exits with 128 + the signal
        results |= {"status": Status.INTERRUPTED, "error": str(stop)}
        raise
    except ConfigError as error:
        results |= {"status": Status.FAILED, "error": str(error)}
        raise
    except Exception as error:
        results |= {"status": Status.FAILED, "error": f"{type(error).__name__}: {error}"}
        raise
    finally:
        results["duration_s"] = round(time.perf_counter() - started, 3)
        results["peak_rss_mb"] = peak_rss_mb()
        if (gpu_mb := peak_gpu_mb()) is not None:
            results["peak_gpu_mb"] = gpu_mb
        if is_rank_zero():
            write_results(run_dir, results)

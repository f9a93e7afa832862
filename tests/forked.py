"""Run a script of the project as `python SCRIPT ARGS` would, in a process forked from a server that has already
imported torch, Lightning and descent: the script's own code runs from its first line, through Hydra, in a fresh
process with its own environment, folder, arguments, stdout and stderr, without paying ~7 s of imports each time.

conftest.run_script uses it; `DESCENT_TESTS_IN_SUBPROCESS=1` runs every script as a plain subprocess instead.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

# what every script of the project imports first; the server imports them once, with the scripts' environment
PRELOAD = [
    "torch",
    "pytorch_lightning",
    "torchmetrics",
    "hydra",
    "sklearn.model_selection",
    "sklearn.datasets",
    "matplotlib.figure",
    "descent.train",
    "descent.vectorized",
    "descent.evaluate",
    "descent.predict",
    "descent.report",
]

_context: Any = None


def _started(env: dict[str, str]) -> Any:
    """The forkserver context, its server started once with `env` (torch reads its thread counts at import)."""
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            process = context.Process(target=_nothing)
            process.start()
            process.join()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _context = context
    return _context


def _nothing() -> None:
    pass


def run(script: Path, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`python script *args` in `cwd` with `env`, forked from the preloaded server; what subprocess.run would give."""
    command = [sys.executable, str(script), *args]
    with tempfile.TemporaryDirectory(prefix="descent-forked-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        process = _started(env).Process(target=_run_here, args=(str(script), args, str(cwd), env, str(out), str(err)))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(command, process.exitcode, out.read_text(), err.read_text())


def _run_here(script: str, args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """In the forked process: become `python script *args` (argv, sys.path[0], folder, environment, stdout and
    stderr), run the script as __main__, and exit with its code."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, name in ((1, out), (2, err)):
        handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).parent))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

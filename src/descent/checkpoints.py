"""Checkpoint files and the RNG states they carry: written atomically (a kill at any moment leaves a whole file),
serialized at once and written by a background thread, loadable with `torch.load(weights_only=True)`.

It only saves and restores state and writes files; it must never change what a run computes.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from descent.files import write_atomically


def rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors and plain containers. By hand because Lightning's
    own collector keeps numpy's state as an ndarray, which `torch.load(weights_only=True)` refuses."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss_next},
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss"]))


def holds_weights_only(checkpoint: dict[str, Any]) -> bool:
    """Whether a checkpoint is a model's weights without a training state to resume (best.ckpt's kind)."""
    return "state_dict" in checkpoint and "optimizer_states" not in checkpoint


def serialized(checkpoint: dict[str, Any]) -> memoryview:
    """The checkpoint as torch.save writes it, in memory: a snapshot that training can no longer change."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getbuffer()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves each checkpoint with `write_atomically`.

    Written by hand because Lightning's own save stages the file in the system's temp folder and moves it: across
    file systems (a tmpfs /tmp, logs on disk) the move is a copy into the target, which a kill can cut short."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        write_atomically(Path(path), serialized(checkpoint))


class BackgroundCheckpointIO(AtomicCheckpointIO):
    """Serializes a checkpoint at once, then leaves its atomic write (and its fsync) to one thread, in order with the
    removals; a load, and the end of fit or test, wait for the writes queued before them. A write's error is raised
    at the next save, load or teardown.

    A checkpoint of weights only (best.ckpt, each time val/acc improves) is kept in memory instead, as a copy of its
    tensors: it is written just before the next full checkpoint (last.ckpt, on its cadence or on a signal, so that
    the files on disk always agree with each other) and at the end of fit or test, and a load of its path (the test
    of the best weights) gets it from memory.

    Written by hand because Lightning's AsyncCheckpointIO first copies the checkpoint with apply_to_collection, which
    walks all of it in Python, then pickles it in its thread while training wants the GIL; here the thread only writes
    bytes, which releases the GIL (docs/speed.md has the measured A/B).
    """

    def __init__(self) -> None:
        super().__init__()
        self._executor: ThreadPoolExecutor | None = None
        self._error: BaseException | None = None
        self._kept: dict[Path, dict[str, Any]] = {}  # the weights-only checkpoints, by path
        self._unwritten: dict[Path, None] = {}  # those of them not on disk yet, in the order they came

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        if holds_weights_only(checkpoint):
            self._kept[path] = apply_to_collection(checkpoint, torch.Tensor, lambda tensor: tensor.detach().clone())
            self._unwritten[path] = None
            return
        self.write_kept()
        self._kept.pop(path, None)
        self._submit(write_atomically, path, serialized(checkpoint))

    def write_kept(self) -> None:
        """Queue the writes of the weights-only checkpoints kept since the last full one."""
        for path in self._unwritten:
            self._submit(write_atomically, path, serialized(self._kept[path]))
        self._unwritten.clear()

    def remove_checkpoint(self, path: Any) -> None:
        self._kept.pop(Path(path), None)
        self._unwritten.pop(Path(path), None)
        self._submit(super().remove_checkpoint, path)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        kept = self._kept.get(Path(path))
        if kept is not None:
            return dict(kept)  # a new dict: a loader may add or pop keys; the tensors are copied by load_state_dict
        self.wait()
        return super().load_checkpoint(path, *args, **kwargs)

    def wait(self) -> None:
        """Return once every write queued so far is on disk; raise the error of one that failed."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        self._raise_error()

    def teardown(self) -> None:
        self.write_kept()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._raise_error()

    def _submit(self, task: Callable[..., None], *args: Any) -> None:
        self._raise_error()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._executor.submit(self._run, task, *args)

    def _run(self, task: Callable[..., None], *args: Any) -> None:
        try:
            task(*args)
        except BaseException as error:  # kept for the training thread, which raises it
            self._error = self._error or error

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

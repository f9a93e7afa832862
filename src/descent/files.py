"""Files written atomically: a kill at any moment leaves either the previous file or the new one, whole."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it: done once, at import, before any thread writes files
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # the mode open() gives a new file; mkstemp's own 0600 would hide files from a team


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to a temporary file in `path`'s folder, sync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fchmod(file.fileno(), FILE_MODE)
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

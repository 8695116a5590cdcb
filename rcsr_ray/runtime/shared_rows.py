"""A float32 matrix in shared memory (a file in /dev/shm), for client deltas that an actor on the
driver's machine hands back without going through Ray's object store.

Returning a chunk's deltas (0.5 MB per client) as task results costs the actor a pickle and an
object-store put per chunk, and the driver and raylet their bookkeeping: on 2 cores that was a
tenth of a packed Ray round. Through this matrix an actor writes each delta into its row (one
memcpy) and returns only the small rest of the update. No Ray here: both ends are plain numpy.

The space is reserved up front (`posix_fallocate`), so a full tmpfs fails here, where the caller
can fall back to the object store, and never as a SIGBUS in the middle of a write. The file goes
with the driver; files left by drivers that were killed outright are removed by the next one.
"""
from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path

import numpy as np

SHM_DIR = "/dev/shm"
PREFIX = "rcsr-ray-deltas-"


class SharedRows:
    """The driver's end: a (rows, cols) float32 matrix in a file it creates and removes."""

    def __init__(self, rows: int, cols: int, directory: str = SHM_DIR):
        self.shape = (rows, cols)
        fd, self.path = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", dir=directory)
        # Removed when this object goes, or at interpreter exit, whichever comes first.
        self._remove = weakref.finalize(self, _unlink, self.path)
        try:
            os.posix_fallocate(fd, 0, rows * cols * 4)
        except OSError:
            os.close(fd)
            self._remove()
            raise
        os.close(fd)
        self.array = np.memmap(self.path, np.float32, "r+", shape=self.shape)

    @classmethod
    def create(cls, rows: int, cols: int, directory: str = SHM_DIR) -> "SharedRows | None":
        """A matrix, or None where there is no shared-memory directory or no room in it."""
        if not os.path.isdir(directory):
            return None
        remove_orphans(directory)
        try:
            return cls(rows, cols, directory)
        except OSError:
            return None

    def row(self, i: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """A private copy of row i (its columns start:stop): the row itself is written again next round."""
        return np.array(self.array[i, start:stop])

    def close(self) -> None:
        self.array = None
        self._remove()


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_orphans(directory: str = SHM_DIR) -> list[str]:
    """Remove the matrices of drivers that are no longer running (killed outright: no finalizer ran)."""
    removed = []
    for path in Path(directory).glob(f"{PREFIX}*"):
        pid = path.name[len(PREFIX):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _unlink(path)
            removed.append(str(path))
        except PermissionError:
            pass  # alive, another user's
    return removed


class RowWriter:
    """An actor's end: the latest matrix it was told about, opened once and kept."""

    def __init__(self):
        self.path, self.array = None, None

    def close(self) -> None:
        self.path, self.array = None, None

    def open(self, path: str, shape: tuple[int, int]) -> np.ndarray | None:
        """The matrix at `path`, or None if this process cannot open it (it is on another machine)."""
        if path != self.path or self.array is None or self.array.shape != tuple(shape):
            try:
                self.array = np.memmap(path, np.float32, "r+", shape=tuple(shape))
            except (OSError, ValueError):
                self.array = None
            self.path = path
        return self.array

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

import contextlib
import fcntl
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np

SHM_DIR = "/dev/shm"
PREFIX = "rcsr-ray-deltas-"


class SharedRows:
    """The driver's end: a (rows, cols) matrix (float32 unless told) in a file it creates and removes."""

    def __init__(self, rows: int, cols: int, directory: str = SHM_DIR, dtype=np.float32):
        self.shape = (rows, cols)
        fd, self.path = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", dir=directory)
        # Removed when this object goes, or at interpreter exit, whichever comes first.
        self._remove = weakref.finalize(self, _unlink, self.path)
        try:
            os.posix_fallocate(fd, 0, rows * cols * np.dtype(dtype).itemsize)
        except OSError:
            os.close(fd)
            self._remove()
            raise
        os.close(fd)
        self.array = np.memmap(self.path, dtype, "r+", shape=self.shape)

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


class TailPool:
    """A round's last clients, which actors on the driver's machine claim themselves, one at a time,
    when they have nothing queued: an int64 array in a file beside the delta matrix, read and written
    under an exclusive lock (`flock`) by the driver and every actor.

    Handed out by the driver, each of these clients would cost an actor a round trip to the driver
    (it asks when its chunk is done), and the driver must guess ahead who runs out first. From the
    pool, whoever is free takes the next one at once: its own clients first (their data is loaded),
    largest first, then the smallest of the others'. The layout: call, clients in the pool, closed;
    per actor the tasks sent to it this call (CLOSED: it may claim nothing more); the clients; their
    home actors; who claimed each (FREE: nobody yet, TAKEN: the driver took it back)."""

    HEADER = 3
    CLOSED = 2**62  # as an actor's task count: never reached, so it claims nothing
    FREE, TAKEN = -1, -2

    def __init__(self, actors: int, capacity: int, path: str | None = None, directory: str = SHM_DIR):
        """The driver's end (path None: a new file in `directory`) or an actor's (the driver's file)."""
        self.actors, self.capacity = actors, capacity
        size = self.HEADER + actors + 3 * capacity
        self._rows = None if path is not None else SharedRows(1, size, directory, dtype=np.int64)
        self.path = path or self._rows.path
        self.fd = os.open(self.path, os.O_RDWR)
        self._close_fd = weakref.finalize(self, os.close, self.fd)
        self.array = self._rows.array[0] if self._rows is not None else np.memmap(self.path, np.int64, "r+", shape=(size,))
        a, c = self.HEADER, self.HEADER + actors
        self.sent = self.array[a:c]
        self.clients, self.homes, self.claimer = (self.array[c + i * capacity:c + (i + 1) * capacity] for i in range(3))

    @property
    def spec(self) -> tuple[str, int, int]:
        """(path, actors, capacity): what an actor opens this pool with."""
        return self.path, self.actors, self.capacity

    @contextlib.contextmanager
    def _locked(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield self.array
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    # The driver's side.

    def start(self, call: int) -> None:
        """A new call: an empty pool, no task sent to anyone yet."""
        with self._locked() as a:
            a[:self.HEADER] = (call, 0, 0)
            self.sent[:] = 0

    def sent_task(self, actor: int) -> None:
        """The driver sent `actor` a task of this call (counted before it is sent)."""
        with self._locked():
            if self.sent[actor] != self.CLOSED:
                self.sent[actor] += 1

    def fill(self, clients: list[int], homes: list[int]) -> None:
        """Put `clients` (this call's, largest first, with their home actors) in the empty pool."""
        with self._locked() as a:
            n = len(clients)
            self.clients[:n], self.homes[:n], self.claimer[:n] = clients, homes, self.FREE
            a[1] = n

    def close(self, actor: int | None = None) -> None:
        """`actor` may claim nothing more this call (it failed); None: nobody may (time is up)."""
        with self._locked() as a:
            if actor is None:
                a[2] = 1
            else:
                self.sent[actor] = self.CLOSED

    def left(self) -> int:
        """Clients in the pool that nobody has claimed yet."""
        with self._locked() as a:
            return int((self.claimer[:a[1]] == self.FREE).sum())

    def claimed_by(self, actor: int) -> list[int]:
        with self._locked() as a:
            n = a[1]
            return [int(c) for c in self.clients[:n][self.claimer[:n] == actor]]

    def take_back(self) -> list[int]:
        """The clients nobody claimed; nobody can claim them after."""
        with self._locked() as a:
            free = self.claimer[:a[1]] == self.FREE
            left = [int(c) for c in self.clients[:a[1]][free]]
            self.claimer[:a[1]][free] = self.TAKEN
            return left

    # An actor's side.

    def claim(self, call: int, actor: int, started: int) -> int | None:
        """The next client for `actor`, which has begun `started` tasks of call `call`; None when the
        pool has nothing left or is closed, belongs to another call, or a task of this call is queued
        behind the actor's current one (it runs that first)."""
        with self._locked() as a:
            n = a[1]
            if a[0] != call or a[2] or self.sent[actor] != started:
                return None
            free = self.claimer[:n] == self.FREE
            own = np.flatnonzero(free & (self.homes[:n] == actor))
            others = np.flatnonzero(free)
            if not others.size:
                return None
            i = own[0] if own.size else others[-1]
            self.claimer[i] = actor
            return int(self.clients[i])

    def release(self) -> None:
        self.array = self.sent = self.clients = self.homes = self.claimer = None
        self._close_fd()
        if self._rows is not None:
            self._rows.close()

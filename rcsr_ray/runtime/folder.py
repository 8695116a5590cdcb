"""A run's folder as `--out` names it: checked before any work, refused when it holds another run.

Light on imports (no torch): the CLI checks the folder before it starts Ray.
"""
from __future__ import annotations

import fcntl
import os
import shlex
from pathlib import Path

from rcsr_ray.config import Config, ConfigError, _flatten, dump_yaml, load_config

CONFIG = "config.yaml"
LOCK = ".rcsr-ray.lock"  # held by the run writing the folder (`FolderLock`)
# What a folder holds once a run there has results to lose: a checkpoint, or the finished run's files.
RESULTS = ("checkpoint.pt", "summary.json", "final.pt")
# Keys that may differ between an interrupted run and the invocation that continues it: where and
# how it runs, not what it computes.
FREE = ("data.cache_dir", "runtime.backend", "runtime.num_cpus", "runtime.address", "runtime.clients_per_actor",
        "runtime.client_cpus", "runtime.driver_cpus", "runtime.faults", "runtime.round_timeout_s",
        "runtime.max_restarts", "runtime.round_retries", "runtime.checkpoint_every")


class RunFolderError(ValueError):
    """The folder asked for cannot take this run."""


def results_config(tree: dict) -> dict:
    """What a run's rounds compute: a config's `to_dict` tree less the keys free to change on
    resume, and less fed.rounds, which says only how many there are (a run can be extended)."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for key in (*FREE, "fed.rounds"):
        section, name = key.split(".")
        d.get(section, {}).pop(name, None)
    return d


def config_changes(old: Config, new: Config) -> list[str]:
    """The keys on which `new` gives other results than `old`, as `key: old -> new`."""
    a, b = (_flatten(results_config(c.to_dict())) for c in (old, new))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def check(out: Path, cfg: Config, locked: bool = False) -> None:
    """Refuse `out` where it cannot take this run: a file (or a path below one), a folder another
    run is writing to (unless `locked`: this run holds the lock), or a folder with another config's
    results, which this run would overwrite or, like router.csv, leave beside its own. Writes
    nothing: the CLI checks before it starts Ray."""
    out = Path(out)
    _refuse_files(out)
    if not locked and (holder := FolderLock(out).holder()) is not None:
        raise FolderLock.busy(out, holder)
    saved = out / CONFIG
    if not saved.is_file() or not any((out / name).exists() for name in RESULTS):
        return  # nothing to lose: a new folder, or one whose run stopped before its first checkpoint
    try:
        theirs = load_config(saved)
    except ConfigError as exc:
        raise RunFolderError(f"--out {out}: holds a run whose {CONFIG} this version cannot read "
                             f"({exc}); choose another --out") from None
    changes = config_changes(theirs, cfg)
    if cfg.fed.rounds < theirs.fed.rounds:
        changes.insert(0, f"fed.rounds: {theirs.fed.rounds} -> {cfg.fed.rounds}, fewer: a run can be extended, not cut")
    if changes:
        more = f"; and {len(changes) - 3} more" if len(changes) > 3 else ""
        raise RunFolderError(f"--out {out}: holds a run of another config ({'; '.join(changes[:3])}{more}); "
                             f"continue it with `{continue_command(out)}`, or choose another --out")


def _refuse_files(out: Path) -> None:
    """Refuse `out` when it, or a folder it would go in, is a file."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise RunFolderError(f"--out {out}: {'a file' if p == out else f'{p} is a file'}, not a folder")
            return


def write_config(out: Path, cfg: Config) -> None:
    """Write config.yaml into `out` (a folder `check` passed), so that the folder of a run interrupted
    from here on says how to continue it; atomically, as another process may be reading it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{CONFIG}.{os.getpid()}.tmp"
    tmp.write_text(dump_yaml(cfg))
    os.replace(tmp, out / CONFIG)


def continue_command(out: Path) -> str:
    """The command that continues the run in `out`, quoted for a shell."""
    out = str(out)
    return f"rcsr-ray run --config {shlex.quote(os.path.join(out, CONFIG))} --out {shlex.quote(out)}"


class FolderLock:
    """Held by the run that writes a folder, from its check of the folder (before any setup) to its
    results: a second run started on the same --out is refused, instead of interleaving its checkpoints and
    results with the first's. An flock on OUT/.rcsr-ray.lock, which names the holder's pid for the
    message. The kernel drops it when the holding process ends, however it ends (the file stays
    then, unlocked, until the next run there removes it); a release removes the file, and the
    folder when acquiring made it and nothing else was written."""

    def __init__(self, out: Path):
        self.out = Path(out)  # as named, for messages
        self.path = self.out.resolve() / LOCK  # the same file whatever the working directory later
        self.fd: int | None = None
        self.owner: int | None = None  # the pid that acquired it: a forked child must not release it
        self.made_folder = False

    @staticmethod
    def busy(out: Path, holder: str) -> RunFolderError:
        return RunFolderError(f"--out {out}: another run (pid {holder}) is writing to it; "
                              "wait until it ends, or choose another --out")

    def holder(self) -> str | None:
        """The pid of the run holding the lock now, else None; takes nothing and writes nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None  # no lock file, or none this user may read (acquiring will say so)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(fd)
        finally:
            os.close(fd)  # also lets go of the shared lock, if it was had
        return None

    def acquire(self) -> "FolderLock":
        _refuse_files(self.out)
        folder = self.path.parent
        while True:
            if not folder.is_dir():
                try:
                    folder.mkdir(parents=True)
                    self.made_folder = True
                except FileExistsError:
                    pass  # another run made it meanwhile
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # the folder went meanwhile (another run's release removed it empty)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _pid_in(fd)
                os.close(fd)
                self._remove_made_folder()
                raise self.busy(self.out, holder) from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the previous holder removed the file we opened: lock the one there now
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd, self.owner = fd, os.getpid()
        return self

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.fd is None or self.owner != os.getpid():
            return
        # Removed while still locked, so nobody can lock this file after the release.
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        self._remove_made_folder()

    def _remove_made_folder(self) -> None:
        if self.made_folder:
            try:
                self.path.parent.rmdir()  # only while empty: nothing of a run is lost
            except OSError:
                pass
            self.made_folder = False


def _pid_in(fd: int) -> str:
    """The pid a lock file's holder wrote into it ("?" before it wrote it)."""
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"

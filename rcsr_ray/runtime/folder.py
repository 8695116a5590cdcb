"""A run's folder as `--out` names it: checked before any work, refused when it holds another run.

Light on imports (no torch): the CLI checks the folder before it starts Ray.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from rcsr_ray.config import Config, ConfigError, _flatten, dump_yaml, load_config

CONFIG = "config.yaml"
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


def check(out: Path, cfg: Config) -> None:
    """Refuse `out` where it cannot take this run: a file (or a path below one), or a folder with
    another config's results, which this run would overwrite or, like router.csv, leave beside its
    own. Writes nothing: the CLI checks before it starts Ray."""
    out = Path(out)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise RunFolderError(f"--out {out}: {'a file' if p == out else f'{p} is a file'}, not a folder")
            break
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

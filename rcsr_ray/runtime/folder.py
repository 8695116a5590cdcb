"""A run's folder as `--out` names it: claimed before any work, refused when it holds another run.

Light on imports (no torch): the CLI checks the folder before it starts Ray.
"""
from __future__ import annotations

from pathlib import Path

from rcsr_ray.config import Config, ConfigError, _flatten, dump_yaml, load_config

CONFIG = "config.yaml"
# Keys that may differ between an interrupted run and the invocation that continues it.
FREE = ("runtime.backend", "runtime.num_cpus", "runtime.address", "runtime.clients_per_actor",
        "runtime.client_cpus", "runtime.faults", "runtime.round_timeout_s")


class RunFolderError(ValueError):
    """The folder asked for cannot take this run."""


def results_config(cfg: Config) -> dict:
    """What a run's results depend on: the config less the keys free to change on resume."""
    d = cfg.to_dict()
    for key in FREE:
        section, name = key.split(".")
        d[section].pop(name, None)
    return d


def config_changes(old: Config, new: Config) -> list[str]:
    """The keys on which `new` gives other results than `old`, as `key: old -> new`."""
    a, b = _flatten(results_config(old)), _flatten(results_config(new))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def claim(out: Path, cfg: Config) -> None:
    """Make `out` this run's folder before any work: refuse a file, and a folder that holds a run of
    another config (its files would be overwritten or, like router.csv, left beside this run's);
    write config.yaml at once, so that an interrupted run's folder says how to continue it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out}: a file, not a folder")
    saved = out / CONFIG
    if saved.is_file():
        try:
            theirs = load_config(saved)
        except ConfigError as exc:
            raise RunFolderError(f"--out {out}: holds a run whose {CONFIG} this version cannot read "
                                 f"({exc}); choose another --out") from None
        changes = config_changes(theirs, cfg)
        if changes:
            more = f"; and {len(changes) - 3} more" if len(changes) > 3 else ""
            raise RunFolderError(f"--out {out}: holds a run of another config ({'; '.join(changes[:3])}{more}); "
                                 f"continue it with `rcsr-ray run --config {saved} --out {out}`, "
                                 "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(dump_yaml(cfg))

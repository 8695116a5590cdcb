"""Sweep specs: a base config plus grids and distributions over config keys, validated up front.

A spec is YAML (see tune/README.md):

    name: smoke                 # experiment name (the sweep folder's default name)
    preset: S4                  # base preset, then `config` keys, then command-line keys
    config: {fed.rounds: 10}    # base config keys, dotted or nested
    grid:                       # every combination is a trial (tune.grid_search)
      partition.alpha: [0.1, 1.0]
    sample:                     # drawn per trial: {uniform|loguniform: [lo, hi]}, {randint: [lo, hi)}, {choice: [...]}
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    num_samples: 1              # repeats of the grid (with fresh draws from `sample`)
    client_actors: 1            # client actors per trial, each runtime.client_cpus CPUs, plus one driver bundle
    driver_cpus: 1              # CPUs reserved for the trial's driver (the round loop)
    max_concurrent_trials: null # null: as many as the cluster's CPUs allow
    asha: null                  # or {grace_period: 2, reduction_factor: 2}: stop weak trials early on mean_r1

Everything is checked before any trial starts: the config is built for every grid point and for
every distribution's bounds, so a bad value stops the sweep with one line naming the key.
This module does not import Ray.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rcsr_ray.config import Config, ConfigError, _flatten, load_config, parse_override, with_overrides

SPEC_FILE = "spec.yaml"  # the spec a sweep folder was started with

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
SPEC_KEYS = ("name", "preset", "config", "grid", "sample", "num_samples", "client_actors", "driver_cpus",
             "max_concurrent_trials", "asha", "fail_fast")
ASHA_KEYS = ("grace_period", "reduction_factor", "brackets")
# The grid points are all built when there are at most this many; beyond, each value is built alone.
_FULL_PRODUCT_LIMIT = 5000


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]  # the spec's dotted config keys and preset, then command-line keys (not resolved, so
    # that a swept `preset` still applies under them)
    grid: dict[str, list]  # key -> values, every combination is a trial
    sample: dict[str, tuple[str, list]] = field(default_factory=dict)  # key -> (distribution, arguments)
    num_samples: int = 1
    client_actors: int = 1
    driver_cpus: float = 1.0
    max_concurrent_trials: int | None = None
    asha: dict | None = None
    fail_fast: bool = False
    source: str = ""  # the spec file, for messages

    @property
    def swept(self) -> list[str]:
        return [*self.grid, *self.sample]

    @property
    def num_trials(self) -> int:
        return math.prod(len(v) for v in self.grid.values()) * self.num_samples

    def trial_config(self, params: dict[str, Any]) -> Config:
        """The trial's config: base keys, then the trial's swept values, then its actor layout."""
        cfg = load_config(overrides={**self.base, **params})
        return with_overrides(cfg, actor_layout(cfg, self.client_actors))

    def to_dict(self) -> dict:
        return {"name": self.name, "config": self.base, "grid": self.grid,
                "sample": {k: {d: a} for k, (d, a) in self.sample.items()}, "num_samples": self.num_samples,
                "client_actors": self.client_actors, "driver_cpus": self.driver_cpus,
                "max_concurrent_trials": self.max_concurrent_trials, "asha": self.asha,
                "fail_fast": self.fail_fast}


def actor_layout(cfg: Config, client_actors: int) -> dict[str, Any]:
    """runtime.clients_per_actor such that the trial's clients fill at most `client_actors` actors,
    so the runtime never sizes itself from the whole cluster inside a trial."""
    n = training_clients(cfg)
    return {"runtime.clients_per_actor": math.ceil(n / min(client_actors, n))}


def training_clients(cfg: Config) -> int:
    """Clients the backend trains: `central` pools everyone into one client."""
    return 1 if cfg.fed.method == "central" else cfg.partition.num_clients


def trial_actors(cfg: Config) -> int:
    """Client actors the trial's backend will create (0: no Ray actors: local backend or no training)."""
    from rcsr_ray.fl.strategy import training_rounds  # here: `rcsr-ray report` reads specs without torch

    if cfg.runtime.backend != "ray" or training_rounds(cfg) == 0:
        return 0
    return math.ceil(training_clients(cfg) / cfg.runtime.clients_per_actor)


def _err(spec: str, key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{spec}: {key}", value, allowed)


def _positive_int(spec: str, key: str, value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _err(spec, key, value, "a positive integer" + (" or null" if allow_none else ""))
    return value


def _distribution(spec: str, key: str, value: Any) -> tuple[str, list]:
    if not (isinstance(value, dict) and len(value) == 1):
        raise _err(spec, f"sample.{key}", value, f"one of {{{' | '.join(DISTRIBUTIONS)}: [...]}}")
    (dist, args), = value.items()
    where = f"sample.{key}.{dist}"
    if dist not in DISTRIBUTIONS:
        raise _err(spec, f"sample.{key}", dist, f"a distribution, one of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise _err(spec, where, args, "a non-empty list")
    if dist == "choice":
        return dist, args
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise _err(spec, where, args, "[low, high], two numbers")
    lo, hi = args
    if dist == "randint" and not (isinstance(lo, int) and isinstance(hi, int) and lo < hi):
        raise _err(spec, where, args, "[low, high) integers with low < high")
    if not lo < hi:
        raise _err(spec, where, args, "[low, high] with low < high")
    if dist == "loguniform" and lo <= 0:
        raise _err(spec, where, args, "[low, high] with 0 < low < high")
    return dist, args


def _probe_values(dist: str, args: list) -> list:
    """Values that stand for a distribution when validating: its options, or its bounds."""
    if dist == "choice":
        return args
    if dist == "randint":
        return [args[0], args[1] - 1]
    return list(args)


def load_spec(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a spec file; `overrides` (key=value) change the base config, not swept keys."""
    src = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--spec", src, "an existing YAML file")
    try:
        tree = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("--spec", src, f"valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError("--spec", src, "a YAML mapping with grid, config, ... (see tune/README.md)")
    return parse_spec(tree, src, overrides, default_name=p.stem)


def parse_spec(tree: dict, src: str = "spec", overrides: list[str] | dict[str, Any] | None = None,
               default_name: str = "sweep") -> SweepSpec:
    for key in tree:
        if key not in SPEC_KEYS:
            raise _err(src, key, tree[key], f"unknown spec key (allowed: {', '.join(SPEC_KEYS)})")
    config = tree.get("config") or {}
    if not isinstance(config, dict):
        raise _err(src, "config", config, "a mapping of config keys")
    grid_tree, sample_tree = tree.get("grid") or {}, tree.get("sample") or {}
    for section, value in (("grid", grid_tree), ("sample", sample_tree)):
        if not isinstance(value, dict):
            raise _err(src, section, value, "a mapping of config key -> values")
    if not grid_tree and not sample_tree:
        raise _err(src, "grid", grid_tree, "at least one swept key in grid or sample")
    # Swept keys are dotted; a nested mapping under `grid` would be read as a distribution.
    grid = {}
    for key, values in grid_tree.items():
        if not isinstance(values, list) or not values:
            raise _err(src, f"grid.{key}", values, "a non-empty list of values")
        grid[key] = values
    sample = {key: _distribution(src, key, value) for key, value in sample_tree.items()}
    both = set(grid) & set(sample)
    if both:
        key = sorted(both)[0]
        raise _err(src, f"sample.{key}", sample_tree[key], "a key swept only once (it is also in grid)")

    base = _flatten(config)
    if "preset" in tree:
        base["preset"] = tree["preset"]
    cli = overrides if isinstance(overrides, dict) else dict(parse_override(o) for o in overrides or [])
    for key in cli:
        if key in grid or key in sample:
            raise ConfigError(key, cli[key], f"swept by {src}; change its values in the spec")
    base.update(cli)
    try:
        load_config(overrides=base)
    except ConfigError as exc:
        raise ConfigError(f"{src}: config: {exc.key}", exc.value, exc.allowed) from None

    asha = tree.get("asha")
    if asha is not None:
        if not isinstance(asha, dict):
            raise _err(src, "asha", asha, f"null or a mapping with {', '.join(ASHA_KEYS)}")
        for key, value in asha.items():
            if key not in ASHA_KEYS:
                raise _err(src, f"asha.{key}", value, f"one of {', '.join(ASHA_KEYS)}")
            _positive_int(src, f"asha.{key}", value)
        if asha.get("reduction_factor", 2) < 2:
            raise _err(src, "asha.reduction_factor", asha["reduction_factor"], "an integer >= 2")
    driver_cpus = tree.get("driver_cpus", 1.0)
    if isinstance(driver_cpus, bool) or not isinstance(driver_cpus, (int, float)) or driver_cpus <= 0:
        raise _err(src, "driver_cpus", driver_cpus, "a number > 0")
    fail_fast = tree.get("fail_fast", False)
    if not isinstance(fail_fast, bool):
        raise _err(src, "fail_fast", fail_fast, "true or false")
    name = tree.get("name", default_name)
    if not isinstance(name, str) or not name or "/" in name:
        raise _err(src, "name", name, "a folder name (no '/')")
    spec = SweepSpec(name=name, base=base, grid=grid, sample=sample,
                     num_samples=_positive_int(src, "num_samples", tree.get("num_samples", 1)),
                     client_actors=_positive_int(src, "client_actors", tree.get("client_actors", 1)),
                     driver_cpus=float(driver_cpus),
                     max_concurrent_trials=_positive_int(src, "max_concurrent_trials",
                                                         tree.get("max_concurrent_trials"), allow_none=True),
                     asha=asha, fail_fast=fail_fast, source=src)
    validate(spec)
    if asha is not None and asha.get("grace_period", 1) > max_rounds(spec):
        raise _err(src, "asha.grace_period", asha["grace_period"], f"at most fed.rounds ({max_rounds(spec)})")
    return spec


def max_rounds(spec: SweepSpec) -> int:
    """The most rounds any trial runs (ASHA's horizon)."""
    values = spec.grid.get("fed.rounds") or [None]
    return max(spec.trial_config({} if v is None else {"fed.rounds": v}).fed.rounds for v in values)


def validate(spec: SweepSpec) -> None:
    """Build the config of every grid point (and of each distribution's bounds); ConfigError names the key."""
    def check(section: str, params: dict[str, Any]) -> None:
        try:
            spec.trial_config(params)
        except ConfigError as exc:
            if exc.key in params:
                raise ConfigError(f"{spec.source}: {section}.{exc.key}", exc.value, exc.allowed) from None
            point = ", ".join(f"{k}={v}" for k, v in params.items())
            raise ConfigError(f"{spec.source}: {section} point {point}: {exc.key}", exc.value, exc.allowed) from None

    for key, values in spec.grid.items():  # each value alone first: the error names the value's own key
        for v in values:
            check("grid", {key: v})
    for key, (dist, args) in spec.sample.items():
        for v in _probe_values(dist, args):
            check("sample", {key: v})
    # Combinations (cross-checks between keys); with one swept key the loop above saw them all.
    if len(spec.grid) > 1 and spec.num_trials // spec.num_samples <= _FULL_PRODUCT_LIMIT:
        keys = list(spec.grid)
        for combo in itertools.product(*spec.grid.values()):
            check("grid", dict(zip(keys, combo)))


def load_saved_spec(out: str | Path) -> SweepSpec:
    """The spec a sweep folder was started with (for `--resume` without `--spec`)."""
    path = Path(out) / SPEC_FILE
    if not path.is_file():
        raise ConfigError("--out", str(out), f"a sweep folder with {SPEC_FILE}")
    return parse_spec(yaml.safe_load(path.read_text()), str(path))

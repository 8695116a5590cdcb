"""Run a sweep with Ray Tune: one function trainable per trial, each trial reserving its own actors.

Each trial is a placement group of one driver bundle (the trainable, which runs the round loop)
plus one bundle per client actor. Tune schedules the trainable with
`placement_group_capture_child_tasks=True` (ray/air/execution/resources/placement_group.py), so
the client actors the trial's runtime creates land in the trial's own bundles: a trial starts only
when its whole group fits, and concurrent trials never oversubscribe the cluster. The trial's
runtime is told exactly how many client actors to make (`runtime.clients_per_actor`), so it never
sizes itself from the whole cluster.

The sweep folder (`--out`) holds `spec.yaml`, Tune's experiment in `trials/` (one folder per trial
with Tune's logs, `trial.json`, `rounds.jsonl` and the trial's run folder `run-<trial id>/`), and the
reports.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import pandas as pd
import ray
import yaml
from ray import tune
from tqdm.auto import tqdm

from rcsr_ray.config import ConfigError, _flatten, load_config
from rcsr_ray.runtime.connect import ensure_ray
from rcsr_ray.runtime.loop import run_simulation
from rcsr_ray.runtime.ray_backend import client_gpu_share
from rcsr_ray.sweep.report import TRIALS_DIR, run_folder, write_sweep_report
from rcsr_ray.sweep.spec import SPEC_FILE, SweepSpec, max_rounds, trial_actors

log = logging.getLogger(__name__)


class _WithoutTunesResumeHint(logging.Filter):
    """Drops Tune's "Resume experiment with: Tuner.restore(...)" after a Ctrl-C: `rcsr-ray sweep`
    prints its own way to continue (--resume), which also checks the spec and reruns failed trials."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Resume experiment with" not in record.getMessage()


def _numbers(row: dict, prefix: str = "") -> dict:
    """The numeric entries of a metrics row or summary (nested dicts flattened with a prefix)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}_"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[prefix + k] = v
    return out


def trial_folder() -> Path:
    """The running trial's folder in the sweep folder, read from the trial's storage context (a
    developer API of Ray). Tune's `get_trial_dir()` is a staging folder that Tune copies there for a
    trial's own actor, but a working directory it never copies in an actor reused from an earlier
    trial (`reuse_actors`)."""
    from ray.train._internal.session import get_storage

    storage = get_storage()
    if storage.storage_filesystem.type_name != "local":  # run_sweep's folder is local: plain files
        raise RuntimeError(f"sweep trials write plain files, but the storage is {storage.storage_filesystem.type_name}")
    return Path(storage.trial_fs_path)


def sweep_trial(config: dict, spec: SweepSpec) -> None:
    """The function trainable: one simulation in the trial's folder, a Tune report per evaluated round."""
    # A reused actor waits this long for the previous trial's thread to end (it ends at once: its
    # run shuts its client actors down), else Tune fails the next trial; Ray's default is 2 s.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")
    ctx = tune.get_context()
    trial_dir = trial_folder()
    trial_dir.mkdir(parents=True, exist_ok=True)
    cfg = spec.trial_config(config)
    info = {"trial_id": ctx.get_trial_id(), "params": config, "start": time.time(), "config": _flatten(cfg.to_dict())}
    (trial_dir / "trial.json").write_text(json.dumps(info, indent=1))

    def on_round(row: dict) -> None:
        metrics = _numbers(row)
        with open(trial_dir / "rounds.jsonl", "a") as f:  # the curve survives an early stop or a failure
            f.write(json.dumps(metrics) + "\n")
        tune.report(metrics)

    # The run folder resumes from its checkpoint when Tune restarts an errored trial.
    summary = run_simulation(cfg, run_folder(trial_dir, info["trial_id"]), progress=False, on_round=on_round).summary
    info["end"] = time.time()
    (trial_dir / "trial.json").write_text(json.dumps(info, indent=1))
    tune.report({**_numbers(summary), "round": summary["rounds"], "trial_start": info["start"],
                 "trial_end": info["end"]})


def trial_resources(spec: SweepSpec):
    """Resources of a trial as a function of its params: a driver bundle plus one per client actor."""

    cluster_gpus = ray.cluster_resources().get("GPU", 0)

    def resources(config: dict):
        cfg = spec.trial_config(config)
        client = {"CPU": cfg.runtime.client_cpus}
        gpus = client_gpu_share(cfg, cluster_gpus)  # what the trial's client actors will ask for
        if gpus:
            client["GPU"] = gpus
        return tune.PlacementGroupFactory([{"CPU": spec.driver_cpus}] + [client] * trial_actors(cfg))

    return resources


def param_space(spec: SweepSpec) -> dict:
    space = {k: tune.grid_search(v) for k, v in spec.grid.items()}
    for key, (dist, args) in spec.sample.items():
        space[key] = getattr(tune, dist)(args) if dist == "choice" else getattr(tune, dist)(*args)
    return space


class TrialLines(tune.Callback):
    """One line per trial start and end, and a bar over trials, instead of Tune's status tables."""

    def __init__(self, total: int, progress: bool):
        self.total, self.progress, self.bar = total, progress, None

    def __getstate__(self):  # Tune pickles its callbacks with the experiment (tuner.pkl); the bar stays here
        return {**self.__dict__, "bar": None}

    def setup(self, **info):
        self.bar = tqdm(total=self.total, desc="sweep", unit="trial", disable=not self.progress, dynamic_ncols=True)

    def _say(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say(f"start  {trial.trial_id}  " + " ".join(f"{k}={v}" for k, v in trial.config.items()))

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        self._say(f"done   {trial.trial_id}  mean_r1={r.get('mean_r1', math.nan):.2f}  rounds={r.get('round', '?')}")
        self.bar.update()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(f"error  {trial.trial_id}  (--resume reruns it); log: {trial.path}")
        self.bar.update()

    def on_experiment_end(self, trials, **info):
        self.bar.close()


def run_sweep(spec: SweepSpec, out: str | Path, resume: bool = False, progress: bool = True,
              trainable=sweep_trial) -> pd.DataFrame:
    """Run (or with `resume`, continue) the sweep into `out`; returns the results table (one row per
    started trial; `attrs["unfinished"]` counts the trials that failed or were interrupted).

    `trainable(config, spec)` is the per-trial function (tests wrap it)."""
    out = Path(out).resolve()
    saved = out / SPEC_FILE
    if resume:
        if not (out / TRIALS_DIR).is_dir():
            raise ConfigError("--resume", str(out), "a sweep folder with a trials/ experiment to continue")
        before = yaml.safe_load(saved.read_text())
        if before != spec.to_dict():
            raise ConfigError("--resume", str(out), f"the same spec and keys as the interrupted sweep ({saved})")
    elif (out / TRIALS_DIR).exists():
        raise ConfigError("--out", str(out), "a new folder (this one holds a sweep: add --resume to continue it)")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))

    ensure_ray(load_config(overrides=spec.base))
    log.info("sweep %s: %d trials on %s CPUs", spec.name, spec.num_trials, ray.cluster_resources().get("CPU"))
    fn = tune.with_resources(tune.with_parameters(trainable, spec=spec), trial_resources(spec))
    if resume:
        # The restored experiment keeps its scheduler and callbacks (as pickled by the first run).
        tuner = tune.Tuner.restore(str(out / TRIALS_DIR), fn, resume_errored=True)
    else:
        scheduler = None
        if spec.asha is not None:
            # Trials that reach the last round are not stopped there: their final summary comes after it.
            scheduler = tune.schedulers.ASHAScheduler(time_attr="round", max_t=max(1, max_rounds(spec)),
                                                      stop_last_trials=False, **spec.asha)
        tuner = tune.Tuner(
            fn, param_space=param_space(spec),
            tune_config=tune.TuneConfig(num_samples=spec.num_samples, metric="mean_r1", mode="max",
                                        scheduler=scheduler, max_concurrent_trials=spec.max_concurrent_trials,
                                        # A trial's actor imports torch and the simulator (about 7 s
                                        # of each smoke trial here); the next trial of the same
                                        # resources runs in it instead.
                                        reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(out), name=TRIALS_DIR, verbose=0,
                                      failure_config=tune.FailureConfig(fail_fast=spec.fail_fast),
                                      callbacks=[TrialLines(spec.num_trials, progress)]))
    hint = _WithoutTunesResumeHint()
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addFilter(hint)
    try:
        tuner.fit()
    finally:
        tune_log.removeFilter(hint)
    table = write_sweep_report(out)
    # Errored trials, and trials an interruption (Ctrl-C) left pending or running, as saved in the
    # experiment state that --resume reads (the ResultGrid of an interrupted fit counts them as ended).
    saved_trials = tune.ExperimentAnalysis(str(out / TRIALS_DIR)).trials
    table.attrs["unfinished"] = sum(t.status != "TERMINATED" for t in saved_trials)
    return table

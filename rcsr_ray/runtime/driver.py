"""The driver actor: the round loop of one run as a named Ray actor.

`rcsr-ray run` on the Ray backend starts a `DriverActor` (named `rcsr-driver-<run folder>`, so the
dashboard lists it beside its client actors) on the node it was started from, so the run folder lands
where the user looks, and waits on it, drawing the progress bar from what the actor reports. The
actor creates and owns the client actors: if it ends, they go with it.
"""
from __future__ import annotations

import threading
from pathlib import Path

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm.auto import tqdm

from rcsr_ray.config import Config
from rcsr_ray.fl.strategy import training_rounds
from rcsr_ray.runtime.connect import ensure_ray
from rcsr_ray.runtime.loop import RunResult, bar_postfix, run_simulation


@ray.remote(max_concurrency=2)  # one thread runs the loop, the other answers progress polls
class DriverActor:
    def __init__(self):
        self.rows: list[dict] = []
        self.round = 0
        self.lock = threading.Lock()

    def run(self, cfg: Config, out_dir: str | None, torch_threads: int, stop_after: int | None = None) -> RunResult:
        # Evaluation rounds differently with another thread count (the server step pins its own,
        # runtime.server_threads): the caller's, so that metrics match a run in the caller's process.
        torch.set_num_threads(torch_threads)
        return run_simulation(cfg, out_dir, progress=False, stop_after=stop_after,
                              on_round=self._row, on_progress=self._progress)

    def _row(self, row: dict) -> None:
        with self.lock:
            self.rows.append(row)

    def _progress(self, round_idx: int) -> None:
        self.round = round_idx

    def progress(self, since: int) -> tuple[int, list[dict]]:
        """The last finished round and the evaluated rows from index `since` on."""
        with self.lock:
            return self.round, self.rows[since:]


def driver_name(out_dir: Path | None) -> str:
    return f"rcsr-driver-{out_dir.name}" if out_dir is not None else "rcsr-driver"


def run_on_ray(cfg: Config, out_dir: str | Path | None, progress: bool = True, poll_s: float = 0.5,
               stop_after: int | None = None) -> RunResult:
    """Run one simulation in a DriverActor and wait for it; errors raised inside come out unwrapped."""
    ensure_ray(cfg)
    out = Path(out_dir).resolve() if out_dir is not None else None
    here = ray.get_runtime_context().get_node_id()
    driver = DriverActor.options(name=driver_name(out), num_cpus=cfg.runtime.driver_cpus, max_restarts=0,
                                 scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote()
    bar = tqdm(total=training_rounds(cfg), desc=cfg.fed.method, unit="round", disable=not progress, dynamic_ncols=True)
    try:
        done_ref = driver.run.remote(cfg, str(out) if out is not None else None, torch.get_num_threads(), stop_after)
        seen = 0
        while True:
            done, _ = ray.wait([done_ref], timeout=poll_s)
            round_idx, rows = ray.get(driver.progress.remote(seen))
            seen += len(rows)
            if rows:
                bar.set_postfix(bar_postfix(rows[-1]))
            bar.update(round_idx - bar.n)
            if done:
                break
        try:
            return ray.get(done_ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, Exception):
                raise exc.cause from None
            raise
    finally:
        bar.close()
        ray.kill(driver)

"""The round loop: sample, broadcast, train, aggregate, evaluate, write the run folder.

Backend-agnostic: the same loop drives the local backend and the Ray actors.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rcsr_ray.config import Config
from rcsr_ray.data.federation import PooledFederation, build_federation, open_store
from rcsr_ray.data.store import FeatureStore
from rcsr_ray.eval.personal import summarize_clients
from rcsr_ray.eval.retrieval import evaluate
from rcsr_ray.fl.client import local_retrieval
from rcsr_ray.fl.strategy import make_strategy, training_rounds
from rcsr_ray.models.adapters import adapter_model, apply_adapters
from rcsr_ray.runtime import checkpoint, rundir
from rcsr_ray.runtime.folder import FolderLock, RunFolderError, check, write_config
from rcsr_ray.runtime.backends import make_backend
from rcsr_ray.runtime.metrics import RunMetrics

log = logging.getLogger(__name__)

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr")


class GlobalEvaluator:
    """Retrieval on the store's test split under given adapter weights. `store` is the feature store,
    or in blocks mode its `InputStore` (models/blocks.py): then the backbone runs on the test images."""

    def __init__(self, store: FeatureStore, cfg: Config):
        test = store.split("test")
        if len(test.image_rows) == 0:
            raise ValueError(f"{store.path}: the feature store has no test images")
        self.images = torch.from_numpy(np.asarray(store.image_emb[test.image_rows]))
        self.captions = torch.from_numpy(np.asarray(store.caption_emb[test.caption_rows]))
        self.caption_image = test.caption_image
        self.protocol = cfg.eval.protocol
        a = cfg.model.adapter
        # Built with the run's initial weights, which the loop takes as its starting point.
        self.model = adapter_model(store, a.bottleneck, a.init_scale, cfg.seed)

    def __call__(self, params: torch.Tensor) -> dict:
        img, txt = apply_adapters(self.model, params, self.images, self.captions)
        m = evaluate(img, txt, self.caption_image, protocol=self.protocol)
        m["mean_r1"] = 0.5 * (m["i2t_r1"] + m["t2i_r1"])
        return m


def bar_postfix(row: dict) -> dict:
    """What a progress bar shows of an evaluated round's metrics row."""
    return {"mean_r1": f"{row['mean_r1']:.1f}", "loss": f"{row['train_loss']:.3f}"}


def _mean_metrics(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


@dataclass
class RunResult:
    summary: dict
    metrics: list[dict]
    params: torch.Tensor
    out_dir: Path | None
    clients: pd.DataFrame  # per-client personalized retrieval


class StopAfter(Exception):
    """Raised by `run_simulation(stop_after=k)` once round k is done and checkpointed (tests of resume)."""


def run_simulation(cfg: Config, out_dir: str | Path | None = None, progress: bool = True,
                   stop_after: int | None = None, on_round=None, on_progress=None) -> RunResult:
    """One simulation. With `out_dir` holding a checkpoint of the same config, it resumes from there.

    `on_round(row)` is called with each evaluated round's metrics row (Tune reports, dashboard
    metrics), for the rounds evaluated in this call; `on_progress(round)` after every round (a
    progress bar drawn by another process)."""
    if out_dir is None:
        return _simulate(cfg, None, progress, stop_after, on_round, on_progress)
    out_dir = Path(out_dir)
    # From the folder's check until its results are written, this run is the folder's only writer.
    with FolderLock(out_dir):
        check(out_dir, cfg, locked=True)  # before the work of setting up
        return _simulate(cfg, out_dir, progress, stop_after, on_round, on_progress)


def _simulate(cfg: Config, out_dir: Path | None, progress: bool, stop_after: int | None, on_round,
              on_progress) -> RunResult:
    """`run_simulation` once its folder, if any, is checked and locked."""
    t0 = time.perf_counter()
    store = open_store(cfg)
    federation = build_federation(cfg, store)
    inputs = store  # what the adapters read: cached features, or (blocks) the backbone's inputs
    if cfg.model.adapter.placement == "blocks":
        from rcsr_ray.models.blocks import BlocksFederation  # loads open_clip only when asked for

        federation = BlocksFederation.wrap(federation, cfg)
        inputs = federation.store
    strategy = make_strategy(cfg, federation.num_clients, federation.partition.num_clusters, store.dim)
    train_fed = PooledFederation(federation) if strategy.name == "central" else federation
    evaluator = GlobalEvaluator(inputs, cfg)
    params = evaluator.model.flat.clone()  # the run's initial adapters
    zeroshot = evaluator(params)
    rounds = training_rounds(cfg)
    rows = [{"round": 0, "seconds": 0.0, **zeroshot}]
    counts = {"completed_client_rounds": 0, "dropped_client_rounds": 0}
    run_name = out_dir.name if out_dir is not None else None
    start = 1
    ckpt = checkpoint.load(out_dir, cfg) if out_dir is not None and rounds else None
    if ckpt is not None and ckpt["round"] > rounds:
        raise RunFolderError(f"--out {out_dir}: its checkpoint is at round {ckpt['round']}, past "
                             f"fed.rounds={rounds}: a run can be extended, not cut")
    backend = make_backend(train_fed, cfg, run_name) if rounds else None
    if ckpt is not None:
        params, rows, counts = ckpt["params"], ckpt["rows"], ckpt["counts"]
        strategy.load_state_dict(ckpt["strategy"], copy_state=False)  # read from disk: nobody else holds it
        backend.load_client_state(ckpt["clients"])
        start = ckpt["round"] + 1
        t0 -= ckpt.get("seconds", 0.0)  # wall seconds go on from the interrupted run's
        log.warning("resuming %s from round %d", out_dir, ckpt["round"])
    if out_dir is not None:
        write_config(out_dir, cfg)
    recorder = RunMetrics(run_name or "unnamed") \
        if backend is not None and backend.name == "ray" else None
    bar = tqdm(range(start, rounds + 1), desc=f"{strategy.name}", unit="round", disable=not progress,
               dynamic_ncols=True, initial=start - 1, total=rounds)
    try:
        for r in bar:
            t_round = time.perf_counter()
            sampled = strategy.sample(r, train_fed.num_clients)
            state, settings = strategy.broadcast(r, params), strategy.client_settings(r)
            dropped = 0
            for attempt in range(cfg.runtime.round_retries + 1):
                updates, failed = backend.train(state, sampled, settings, cfg.seed, r, attempt)
                dropped += len(failed)
                if updates:
                    break
                log.warning("round %d: every client failed (attempt %d)", r, attempt + 1)
            counts["completed_client_rounds"] += len(updates)
            counts["dropped_client_rounds"] += dropped
            if updates:
                params, agg = strategy.server_step(r, params, updates)
            else:
                agg = strategy.round_metrics([])
            agg["dropped_clients"] = dropped  # over every attempt, as summary.json and the metrics counter
            evaluate_now = r % cfg.eval.every == 0 or r == rounds
            if evaluate_now:
                if strategy.name == "local":
                    own = strategy.client_params
                    metrics = _mean_metrics([evaluator(own.get(c, params)) for c in range(train_fed.num_clients)])
                else:
                    metrics = evaluator(params)
                rows.append({"round": r, "seconds": time.perf_counter() - t0, **agg, **metrics})
                bar.set_postfix(bar_postfix(rows[-1]))
                if on_round is not None:
                    on_round(rows[-1])
            if recorder is not None:
                if evaluate_now:
                    recorder.evaluated(metrics)
                recorder.round_done(r, time.perf_counter() - t_round, len(updates), dropped, agg)
            if out_dir is not None and (r % cfg.runtime.checkpoint_every == 0 or r in (stop_after, rounds)):
                checkpoint.save(out_dir, cfg, r, params, rows, counts, strategy.state_dict(),
                                backend.client_state(), time.perf_counter() - t0)
            if on_progress is not None:
                on_progress(r)
            if r == stop_after:
                raise StopAfter(r)
        clients = personalized_eval(federation, strategy, evaluator.model, params, backend)
    finally:
        if backend is not None:
            backend.shutdown()
    final = rows[-1]
    summary = {k: final[k] for k in (*METRIC_KEYS, "mean_r1")}
    summary.update(method=strategy.name, rounds=rounds, seconds=time.perf_counter() - t0,
                   backend=cfg.runtime.backend, preset=cfg.preset, seed=cfg.seed,
                   rejected_updates=strategy.rejected_total, **counts,
                   zeroshot={k: zeroshot[k] for k in (*METRIC_KEYS, "mean_r1")})
    summary.update(summarize_clients(clients))
    out = None
    if out_dir is not None:
        out = rundir.write_run(out_dir, cfg, rows, summary, params, federation, clients,
                               getattr(strategy, "diagnostics", None))
    return RunResult(summary, rows, params, out, clients)


def personalized_eval(federation, strategy, model, params: torch.Tensor, backend) -> pd.DataFrame:
    """Per client, R@1 on its personal test set with the adapters the method gives it: its personal
    ones (evaluated on the client, where they live), its own (local), else the global ones."""
    ids = range(federation.num_clients)
    if strategy.personal:
        results = backend.evaluate_local(params, list(ids))
    else:
        own = getattr(strategy, "client_params", {})
        results = [local_retrieval(model, own.get(c, params), federation.local_test_shard(c)) for c in ids]
    rows = []
    for c, m in zip(ids, results):
        prefix = "personal" if "personal_i2t_r1" in m else "global"
        rows.append({"client": c, "modality": federation.partition.modality_name(c),
                     "samples": len(federation.partition.client_indices[c]),
                     "i2t_r1": m[f"{prefix}_i2t_r1"], "t2i_r1": m[f"{prefix}_t2i_r1"], **m})
    return pd.DataFrame(rows)

"""The Ray backend's GPU path, checked against the CPU: client actors with a fractional GPU share.

Needs a CUDA GPU. Two parts, same config (S4, RCSR with personal adapters, the embedded synthetic
benchmark):

- rounds: the local backend on the CPU and the Ray backend with `runtime.client_gpus` train the
  same sampled clients from the same global state; every client's delta must match the CPU's up to
  float rounding. Reports each actor's torch device, its Ray GPU ids and its CUDA memory, and how
  many deltas came back through the shared matrix;
- runs: `run_simulation` on both, end to end (personalised evaluation on the actors included);
  final metrics must agree within `--tolerance` R@1 points.

    python benchmarks/gpu_check.py                      # about a minute on one GPU
    python benchmarks/gpu_check.py --client-gpus 0.25 --rounds 5
    python benchmarks/gpu_check.py --profile            # and the slowest actor's clients, op by op

Exits non-zero when a check fails. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import ray
import torch

from rcsr_ray.config import load_config
from rcsr_ray.data.federation import build_federation
from rcsr_ray.fl.strategy import make_strategy
from rcsr_ray.runtime.backends import LocalBackend
from rcsr_ray.runtime.loop import run_simulation
from rcsr_ray.runtime.ray_backend import RayBackend


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / (a.norm() + 1e-12))


def compare_rounds(cfg_cpu, cfg_gpu, rounds: int, profile: bool = False) -> dict:
    fed = build_federation(cfg_cpu)
    strategy = make_strategy(cfg_cpu, fed.num_clients, fed.partition.num_clusters, fed.store.dim)
    cpu = LocalBackend(fed, cfg_cpu)
    t0 = time.perf_counter()
    gpu = RayBackend(fed, cfg_gpu, "gpu-check")
    start_s = time.perf_counter() - t0  # actors up, clients attached: CUDA contexts included
    try:
        params = cpu.worker.model.flat.detach().clone()
        gaps = []  # one per update with a delta
        seconds = {"cpu": [], "gpu": []}  # per round, train calls alone
        for r in range(1, rounds + 1):
            state, settings = strategy.broadcast(r, params), strategy.client_settings(r)
            sampled = strategy.sample(r, fed.num_clients)
            t0 = time.perf_counter()
            on_cpu, failed_cpu = cpu.train(state, sampled, settings, cfg_cpu.seed, r)
            t1 = time.perf_counter()
            on_gpu, failed_gpu = gpu.train(state, sampled, settings, cfg_cpu.seed, r)
            seconds["cpu"].append(t1 - t0)
            seconds["gpu"].append(time.perf_counter() - t1)
            if failed_cpu or failed_gpu:
                raise RuntimeError(f"round {r}: failed clients cpu={failed_cpu} gpu={failed_gpu}")
            if [u.client_id for u in on_cpu] != [u.client_id for u in on_gpu]:
                raise RuntimeError(f"round {r}: the backends returned different clients")
            for a, b in zip(on_cpu, on_gpu):
                if (a.delta is None) != (b.delta is None):
                    raise RuntimeError(f"round {r}: client {a.client_id} has a delta on one backend only")
                if a.delta is not None:  # None: the client had nothing it could train on
                    gaps.append(relative_gap(a.delta, b.delta))
            params, _ = strategy.server_step(r, params, on_cpu)  # both go on from the CPU's state

        def describe(actor):
            return {"device": str(actor.worker.device) if actor.worker else None,
                    "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                    "cuda_mib": torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
                    "threads": torch.get_num_threads()}

        def direct(actor, profile=False):
            """Seconds for all the actor's home clients with the last round it ran, called in the actor
            itself (the second of two passes): the actor's compute alone, without the backend's
            scheduling. None for an actor that ran no round. With `profile`, the second pass's torch
            profiler table instead."""
            r = actor.round
            if r is None:
                return None
            for rep in range(2):
                prof = torch.profiler.profile() if profile and rep else contextlib.nullcontext()
                with prof:
                    t0 = time.perf_counter()
                    for c in actor.home:
                        actor.worker.update(c, r.state, r.settings, r.seed, r.round_idx)
                    seconds = time.perf_counter() - t0
            return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15) if profile else seconds

        actors = ray.get([a.__ray_call__.remote(describe) for a in gpu.actors])
        direct_all = ray.get([a.__ray_call__.remote(direct) for a in gpu.actors])
        direct_s = [s for s in direct_all if s is not None]
        if profile:  # the slowest actor's own pass, op by op
            slowest = max(range(len(direct_all)), key=lambda i: direct_all[i] or 0.0)
            print(f"torch profile of actor {slowest}'s clients ({direct_all[slowest]:.3f} s):")
            print(ray.get(gpu.actors[slowest].__ray_call__.remote(direct, True)))
        return {"actors": len(gpu.actors), "clients_per_actor": gpu.per_actor,
                "actor_devices": sorted({a["device"] for a in actors}),
                "actor_gpu_ids": sorted({g for a in actors for g in a["gpu_ids"]}),
                "actor_cuda_mib_max": max(a["cuda_mib"] for a in actors),
                "actor_torch_threads": sorted({a["threads"] for a in actors}),
                "client_updates": len(gaps), "shared_updates": gpu.shared_updates, "gpu_backend_start_s": start_s,
                # the last round: the first moves every shard to the device
                "cpu_train_s": seconds["cpu"][-1], "gpu_train_s": seconds["gpu"][-1],
                "gpu_train_s_by_round": seconds["gpu"], "cpu_train_s_by_round": seconds["cpu"],
                "actor_direct_s": direct_all, "actor_direct_s_max": max(direct_s),
                "delta_gap_max": max(gaps), "delta_gap_median": statistics.median(gaps)}
    finally:
        gpu.shutdown()


def timed_run(cfg) -> tuple[dict, float]:
    t0 = time.perf_counter()
    result = run_simulation(cfg, progress=False)
    return result.summary, (time.perf_counter() - t0) / max(cfg.fed.rounds, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--client-gpus", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--delta-tolerance", type=float, default=1e-3, help="largest relative gap of a delta")
    ap.add_argument("--tolerance", type=float, default=1.0, help="largest gap of mean R@1 (points)")
    ap.add_argument("--profile", action="store_true", help="print the torch profile of the slowest actor's clients")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    keys = {"fed.method": "rcsr", "rcsr.personal": True, "fed.rounds": args.rounds, "eval.every": args.rounds}
    cfg_cpu = load_config(preset="S4", overrides={**keys, "runtime.backend": "local"})
    cfg_gpu = load_config(preset="S4", overrides={**keys, "runtime.backend": "ray",
                                                  "runtime.client_gpus": args.client_gpus})

    res = {"gpu": torch.cuda.get_device_name(0), "client_gpus": args.client_gpus, "rounds": args.rounds,
           "compared_rounds": min(args.rounds, 3)}
    res.update(compare_rounds(cfg_cpu, cfg_gpu, res["compared_rounds"], args.profile))
    cpu_summary, cpu_s = timed_run(cfg_cpu)
    gpu_summary, gpu_s = timed_run(cfg_gpu)
    res.update(cpu_mean_r1=cpu_summary["mean_r1"], gpu_mean_r1=gpu_summary["mean_r1"],
               cpu_dropped=cpu_summary["dropped_client_rounds"], gpu_dropped=gpu_summary["dropped_client_rounds"],
               cpu_run_s_per_round=cpu_s, gpu_run_s_per_round=gpu_s)

    checks = {
        "actors on cuda": res["actor_devices"] == ["cuda"],
        "actors hold a GPU id": bool(res["actor_gpu_ids"]),
        "deltas match the CPU": res["delta_gap_max"] <= args.delta_tolerance,
        "deltas through shared memory": res["shared_updates"] == res["client_updates"],
        "no dropped client-rounds": res["cpu_dropped"] == res["gpu_dropped"] == 0,
        "final mean R@1 agrees": abs(res["cpu_mean_r1"] - res["gpu_mean_r1"]) <= args.tolerance,
    }
    print(f"{res['gpu']}: {res['actors']} client actors x {args.client_gpus} GPU, "
          f"{res['clients_per_actor']} clients each")
    print(f"deltas vs CPU over {res['client_updates']} updates: max relative gap {res['delta_gap_max']:.2e}, "
          f"median {res['delta_gap_median']:.2e}; {res['shared_updates']} through shared memory")
    print(f"Ray backend start (actors, CUDA contexts, clients attached): {res['gpu_backend_start_s']:.1f} s; "
          f"slowest actor running all its clients by itself: {res['actor_direct_s_max']:.2f} s")
    print(f"{'':<12}{'mean R@1':>9}{'train s':>9}{'run s/round':>12}")
    print(f"{'local CPU':<12}{res['cpu_mean_r1']:>9.2f}{res['cpu_train_s']:>9.2f}{cpu_s:>12.2f}")
    print(f"{'Ray GPU':<12}{res['gpu_mean_r1']:>9.2f}{res['gpu_train_s']:>9.2f}{gpu_s:>12.2f}")
    print("train s: one round's client updates (the last compared round); run s/round: a whole run over its "
          "rounds, start-up and evaluation included")
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    res["checks_failed"] = [name for name, ok in checks.items() if not ok]
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in res.items()}))
    sys.exit(1 if res["checks_failed"] else 0)


if __name__ == "__main__":
    main()

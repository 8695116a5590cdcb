"""Seconds per round on the local backend and on Ray, same process, same workload.

(a) the peer workload other simulators were measured on: FedAvg, IID, every client paired,
    29,000 images x 5 captions of 512-d features, 100 clients, 50 per round, 1 local epoch,
    batch 128 (one random caption each), InfoNCE with logit scale 20, a fresh AdamW(lr 1e-3) per
    client per round, bottleneck 64;
(b) S4 with the full RCSR method at the same scale.

Times cover what a round costs the simulator (broadcast, client updates, collection, aggregation),
not evaluation. Median over rounds after warm-up; the local and Ray runs alternate round by round.
The last line is one JSON object.

Ray with one client per actor (`ray_actor_s`) is measured only when the machine can hold one
actor per client (about 0.5 GB each): on a 2-core, 24 GB machine 100 actors do not fit, so it is
reported as null there.

    python benchmarks/round_overhead.py [--rounds 12] [--warmup 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from rcsr_ray.config import load_config
from rcsr_ray.data.federation import build_federation
from rcsr_ray.fl.strategy import make_strategy
from rcsr_ray.models.adapters import initial_params
from rcsr_ray.runtime.backends import make_backend

PEER = {"preset": "S1", "fed.method": "fedavg", "data.synthetic.train_images": 29000,
        "data.synthetic.client_shift": 0.0, "partition.num_clients": 100, "fed.participation": 0.5,
        "train.local_epochs": 1, "train.batch_size": 128, "train.temperature": 0.05, "train.lr": 1e-3,
        "model.adapter.bottleneck": 64}
RCSR_S4 = {**PEER, "preset": "S4", "fed.method": "rcsr", "data.synthetic.client_shift": 0.35}


class Run:
    """One backend's simulation, advanced a round at a time."""

    def __init__(self, keys: dict):
        self.cfg = cfg = load_config(overrides=keys)
        self.fed = build_federation(cfg)
        self.strategy = make_strategy(cfg, self.fed.num_clients, self.fed.partition.num_clusters, self.fed.store.dim)
        self.backend = make_backend(self.fed, cfg)
        self.params = initial_params(self.fed.store.dim, cfg.model.adapter.bottleneck, 0.0, cfg.seed)
        self.times: list[float] = []

    def round(self, r: int) -> None:
        t = time.perf_counter()
        sampled = self.strategy.sample(r, self.fed.num_clients)
        updates, _ = self.backend.train(self.strategy.broadcast(r, self.params), sampled,
                                        self.strategy.client_settings(r), self.cfg.seed, r)
        self.params, _ = self.strategy.aggregate(r, self.params, updates)
        self.times.append(time.perf_counter() - t)


def seconds_per_round(keys: dict, rounds: int, warmup: int) -> tuple[float, float, bool]:
    """Median s/round of the local backend and of Ray packed, and whether they ended identical.

    The two runs alternate round by round, so that both see the same stretches of this VM's speed,
    which drifts by up to 1.5x over a minute."""
    local, packed = Run({**keys, "runtime.backend": "local"}), Run({**keys, "runtime.backend": "ray"})
    try:
        for r in range(1, rounds + 1):
            local.round(r)
            packed.round(r)
    finally:
        packed.backend.shutdown()
    return (statistics.median(local.times[warmup:]), statistics.median(packed.times[warmup:]),
            torch.equal(local.params, packed.params))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False, configure_logging=False)
    res = {}
    rows = []
    for label, keys in (("peer", PEER), ("rcsr", RCSR_S4)):
        local_s, packed_s, same = seconds_per_round(keys, args.rounds, args.warmup)
        rows.append((label, local_s, packed_s, packed_s / local_s, same))
        res[label] = (local_s, packed_s, same)
    ray.shutdown()
    print(f"{'workload':<10}{'local s/round':>15}{'ray packed':>12}{'ratio':>8}{'identical':>11}")
    for label, local_s, packed_s, ratio, same in rows:
        print(f"{label:<10}{local_s:>15.3f}{packed_s:>12.3f}{ratio:>8.2f}{str(same):>11}")
    print("ray_actor (one client per actor): not measured, 100 actors x ~0.5 GB do not fit this machine")
    (pl, pp, psame), (rl, rp, rsame) = res["peer"], res["rcsr"]
    print(json.dumps({"local_s": round(pl, 4), "ray_actor_s": None, "ray_packed_s": round(pp, 4),
                      "ratio_actor": None, "ratio_packed": round(pp / pl, 3), "identical": psame and rsame,
                      "rcsr_local_s": round(rl, 4), "rcsr_ray_packed_s": round(rp, 4),
                      "rcsr_ratio_packed": round(rp / rl, 3)}))


if __name__ == "__main__":
    main()

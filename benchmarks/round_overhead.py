"""Seconds per round on the local backend and on Ray, same process, same workload.

(a) the peer workload other simulators were measured on: FedAvg, IID, every client paired,
    29,000 images x 5 captions of 512-d features, 100 clients, 50 per round, 1 local epoch,
    batch 128 (one random caption each), InfoNCE with logit scale 20, a fresh AdamW(lr 1e-3) per
    client per round, bottleneck 64;
(b) S4 with the full RCSR method at the same scale.

Times cover what a round costs the simulator (broadcast, client updates, collection, aggregation),
not evaluation. Median over rounds after warm-up; the local and Ray runs alternate round by round.
A second table splits a Ray round's CPU between the client actors, the driver, Ray's other processes
(raylet, GCS, dashboard agent, log monitor, idle workers) and idle cores, and sets the CPU the
client updates took on the actors against what the same updates took on the local backend: on a
machine whose cores slow each other down when both are busy, that alone keeps Ray from half the
local time (`floor`: the ratio if the actors' updates were all a Ray round cost, spread over the
cores). `ratio at local speed` takes that slowdown out: the ratio less the extra CPU the actors'
updates took over the same updates on the local backend, spread over the cores; what is left above
1/cores is what the round costs beside the updates. The last line is one JSON object.

With --repeats N the whole measurement runs N times and the tables and JSON give medians over the
runs (a ratio's median is the median of the runs' ratios), plus each run's ratios under "runs".

Ray with one client per actor needs one process per client (about 0.37 GB of private memory each
after training, measured here): it is timed on (a) when the machine holds 100 actors, and always on a smaller
federation of the same clients (`--actor-clients`, the peer workload's 290 images per client,
half of them per round), against the local backend on that same federation (`small_*` keys).
Where (a) does not fit, `ray_actor_s` is null and `ray_actor_skipped` says why.

    python benchmarks/round_overhead.py [--rounds 16] [--warmup 3] [--actor-clients 16] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import ray
import torch

from rcsr_ray.config import load_config
from rcsr_ray.data.federation import build_federation
from rcsr_ray.fl.strategy import make_strategy
from rcsr_ray.models.adapters import initial_params
from rcsr_ray.runtime.backends import make_backend
from rcsr_ray.runtime.connect import start_local_ray

PEER = {"preset": "S1", "fed.method": "fedavg", "data.synthetic.train_images": 29000,
        "data.synthetic.client_shift": 0.0, "partition.num_clients": 100, "fed.participation": 0.5,
        "train.local_epochs": 1, "train.batch_size": 128, "train.temperature": 0.05, "train.lr": 1e-3,
        "model.adapter.bottleneck": 64}
RCSR_S4 = {**PEER, "preset": "S4", "fed.method": "rcsr", "data.synthetic.client_shift": 0.35}
IMAGES_PER_CLIENT = PEER["data.synthetic.train_images"] // PEER["partition.num_clients"]


def with_clients(keys: dict, clients: int) -> dict:
    """`keys` over `clients` clients of the peer workload's size each."""
    return {**keys, "partition.num_clients": clients, "data.synthetic.train_images": clients * IMAGES_PER_CLIENT}


def one_per_actor(keys: dict, clients: int, cpus: float) -> dict:
    """`keys` over `clients` clients, each on its own actor (sharing the CPUs)."""
    return {**with_clients(keys, clients), "runtime.backend": "ray", "runtime.clients_per_actor": 1,
            "runtime.client_cpus": cpus / clients}


def smaps_rollup_kb(pid: int) -> dict[str, int]:
    """A process's memory totals in kB, by field (Linux /proc/PID/smaps_rollup: Pss, Private_Dirty, ...)."""
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]  # the first names the range
    return {name: int(value.split()[0]) for name, value in (line.split(":", 1) for line in lines)}


def private_gb(pid: int) -> float:
    """Memory only this process holds (private clean + dirty)."""
    kb = smaps_rollup_kb(pid)
    return (kb["Private_Clean"] + kb["Private_Dirty"]) / 2**20


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ray_processes(exclude: set[int]) -> list[int]:
    """This machine's Ray processes (raylet, GCS, dashboard agent, log monitor, idle workers...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in exclude:
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"/ray/" in cmd or cmd.startswith(b"ray::"):
                pids.append(int(entry.name))
    return pids


class CpuSplit:
    """Where a Ray round's CPU goes: the client actors, this driver, Ray's other processes, and what
    the machine's cores left idle. Read between rounds, outside the timed part."""

    PARTS = ("actors", "driver", "ray other", "idle")
    CORES = len(os.sched_getaffinity(0))

    def __init__(self, actor_pids: list[int]):
        self.groups = {"actors": actor_pids, "driver": [os.getpid()],
                       "ray other": ray_processes(set(actor_pids) | {os.getpid()})}
        self.rounds: list[dict[str, float]] = []  # ms per round, by part

    def _now(self) -> dict[str, float]:
        return {name: sum(cpu_s(p) for p in pids) for name, pids in self.groups.items()}

    def measure(self, run: "Run", r: int) -> None:
        """Run round `r` of `run` and record its split."""
        before = self._now()
        run.round(r)
        after = self._now()
        ms = {name: 1000 * (after[name] - before[name]) for name in before}
        ms["idle"] = max(0.0, 1000 * self.CORES * run.times[-1] - sum(ms.values()))
        self.rounds.append(ms)

    def mean(self, warmup: int) -> dict[str, float]:
        """ms per round after warm-up: a mean, since the kernel counts CPU time in 10 ms ticks."""
        return {part: statistics.mean(r[part] for r in self.rounds[warmup:]) for part in self.PARTS}


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _update_cpu_s(actor) -> float:
    return actor.worker.update_cpu_s if actor.worker is not None else 0.0


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
        self.params, _ = self.strategy.server_step(r, self.params, updates)
        self.times.append(time.perf_counter() - t)

    def update_cpu_s(self) -> float:
        """CPU seconds its workers have spent in client updates so far (`ClientWorker.update_cpu_s`)."""
        if self.backend.name == "local":
            return self.backend.worker.update_cpu_s
        return sum(ray.get([a.__ray_call__.remote(_update_cpu_s) for a in self.backend.actors]))


def seconds_per_round(local_keys: dict, ray_keys: dict, rounds: int, warmup: int) -> tuple:
    """Median s/round of the local backend and of Ray, whether they ended identical, the largest
    private memory of one of Ray's actors (GB), the mean CPU split of a Ray round (ms), and the mean
    CPU seconds a round's client updates took on the local backend and on Ray's actors.

    The two runs alternate round by round, so that both see the same stretches of this VM's speed,
    which drifts by up to 1.5x over a minute."""
    local, on_ray = Run({**local_keys, "runtime.backend": "local"}), Run(ray_keys)
    try:
        pids = ray.get([a.__ray_call__.remote(lambda actor: os.getpid()) for a in on_ray.backend.actors])
        split = CpuSplit(pids)
        updates = {local: [], on_ray: []}  # CPU seconds in client updates, per round

        def measured(run: Run, play) -> None:
            before = run.update_cpu_s()
            play()
            updates[run].append(run.update_cpu_s() - before)
        for r in range(1, rounds + 1):
            measured(local, lambda: local.round(r))
            measured(on_ray, lambda: split.measure(on_ray, r))
        actor_gb = max(private_gb(pid) for pid in pids)
    finally:
        on_ray.backend.shutdown()
    return (statistics.median(local.times[warmup:]), statistics.median(on_ray.times[warmup:]),
            torch.equal(local.params, on_ray.params), actor_gb, split.mean(warmup),
            statistics.mean(updates[local][warmup:]), statistics.mean(updates[on_ray][warmup:]))


PEER_PACKED, RCSR_PACKED, PEER_ACTOR = "peer, packed", "rcsr, packed", "peer, one per actor"


def small_label(clients: int) -> str:
    return f"peer {clients} clients, one per actor"


def measure_all(args, cpus: float, free_gb: float) -> tuple[dict, str | None]:
    """One run of every workload: label -> `seconds_per_round`'s tuple (local s/round, ray s/round,
    identical, largest actor's private GB, CPU split, update CPU s/round on the local backend and on
    Ray's actors), and why the one-per-actor run of (a) was skipped (None: it ran)."""
    res = {}

    def measure(label: str, local_keys: dict, ray_keys: dict) -> None:
        res[label] = seconds_per_round(local_keys, ray_keys, args.rounds, args.warmup)

    measure(PEER_PACKED, PEER, {**PEER, "runtime.backend": "ray"})
    measure(RCSR_PACKED, RCSR_S4, {**RCSR_S4, "runtime.backend": "ray"})
    small = small_label(args.actor_clients)
    measure(small, with_clients(PEER, args.actor_clients), one_per_actor(PEER, args.actor_clients, cpus))
    # One actor per client of (a), only where the machine holds them.
    clients, actor_gb = PEER["partition.num_clients"], res[small][3]
    need_gb = clients * actor_gb
    if need_gb > free_gb:
        return res, f"{clients} actors x {actor_gb:.2f} GB = {need_gb:.0f} GB > {free_gb:.0f} GB available"
    measure(PEER_ACTOR, PEER, one_per_actor(PEER, clients, cpus))
    return res, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--actor-clients", type=int, default=16, help="clients of the one-client-per-actor run")
    ap.add_argument("--repeats", type=int, default=1,
                    help="whole runs, one after another; tables and JSON give their medians (a run's ratio "
                         "moves by 0.1 with this VM's load, more than most changes to the runtime)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    start_local_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)
    cpus = ray.cluster_resources()["CPU"]
    free_gb = available_gb() - 2  # before any run: what 100 actors could have, with 2 GB to spare
    runs = []
    for i in range(args.repeats):
        runs.append(measure_all(args, cpus, free_gb))
        if args.repeats > 1:
            res = runs[-1][0]
            print(f"run {i + 1}/{args.repeats}: ratio " + ", ".join(
                f"{label} {r[1] / r[0]:.3f}" for label, r in res.items()), flush=True)
    ray.shutdown()
    skipped = runs[-1][1]
    labels = list(runs[-1][0])

    def median(label: str, value) -> float:
        """The median over the runs that measured `label` of value(that run's tuple)."""
        return statistics.median(value(res[label]) for res, _ in runs if label in res)

    # Per workload, medians over the runs: local s, ray s, ratio (of each run's ratio), the actors'
    # update CPU over the local backend's, and the floor (see the module docstring).
    table = {label: {"local": median(label, lambda r: r[0]), "ray": median(label, lambda r: r[1]),
                     "ratio": median(label, lambda r: r[1] / r[0]),
                     "updates": median(label, lambda r: r[6] / r[5]),
                     "floor": median(label, lambda r: r[6] / CpuSplit.CORES / r[0]),
                     "at_local_speed": median(label, lambda r: (r[1] - (r[6] - r[5]) / CpuSplit.CORES) / r[0]),
                     "cpu": {part: median(label, lambda r: r[4][part]) for part in CpuSplit.PARTS}}
             for label in labels}
    identical = all(r[2] for res, _ in runs for r in res.values())
    # One client's actor (the small one-per-actor run): what 100 such actors would each need.
    actor_gb = max(res[small_label(args.actor_clients)][3] for res, _ in runs)
    what = "medians of " + str(args.repeats) + " runs" if args.repeats > 1 else "one run"
    print(f"\n{'workload (' + what + ')':<36}{'local s/round':>14}{'ray':>8}{'ratio':>8}{'identical':>11}")
    for label, t in table.items():
        print(f"{label:<36}{t['local']:>14.3f}{t['ray']:>8.3f}{t['ratio']:>8.2f}{str(identical):>11}")
    if skipped:
        print(f"{PEER_ACTOR}: not measured, {skipped}")
    # The same client updates' CPU on Ray's actors over the local backend's, and the ratio a Ray round
    # would have if those updates were all it cost, spread over the cores.
    print(f"\nwhere a Ray round's CPU goes (ms per round, mean; {CpuSplit.CORES} cores x the round's wall time),")
    print("and the actors' client updates against the same updates on the local backend (CPU):")
    print(f"{'workload':<36}" + "".join(f"{part:>11}" for part in CpuSplit.PARTS)
          + f"{'updates':>11}{'floor':>8}{'ratio at local speed':>22}")
    for label, t in table.items():
        print(f"{label:<36}" + "".join(f"{t['cpu'][part]:>11.0f}" for part in CpuSplit.PARTS)
              + f"{t['updates']:>10.2f}x{t['floor']:>8.2f}{t['at_local_speed']:>22.2f}")
    peer, rcsr, small = table[PEER_PACKED], table[RCSR_PACKED], table[small_label(args.actor_clients)]
    actor = table.get(PEER_ACTOR)
    out = {
        "local_s": round(peer["local"], 4), "ray_actor_s": actor and round(actor["ray"], 4),
        "ray_packed_s": round(peer["ray"], 4), "ratio_actor": actor and round(actor["ratio"], 3),
        "ratio_packed": round(peer["ratio"], 3), "identical": identical, "rcsr_local_s": round(rcsr["local"], 4),
        "rcsr_ray_packed_s": round(rcsr["ray"], 4), "rcsr_ratio_packed": round(rcsr["ratio"], 3),
        "ray_actor_skipped": skipped, "small_clients": args.actor_clients, "small_local_s": round(small["local"], 4),
        "small_ray_actor_s": round(small["ray"], 4), "small_ratio_actor": round(small["ratio"], 3),
        "actor_private_gb": round(actor_gb, 3),
        "ray_cpu_ms": {label: {part: round(ms, 1) for part, ms in t["cpu"].items()} for label, t in table.items()},
        "update_cpu_ratio": {label: round(t["updates"], 3) for label, t in table.items()},
        "ratio_floor": {label: round(t["floor"], 3) for label, t in table.items()},
        "ratio_at_local_update_speed": {label: round(t["at_local_speed"], 3) for label, t in table.items()},
        "repeats": args.repeats}
    if args.repeats > 1:
        out["runs"] = [{label: round(r[1] / r[0], 3) for label, r in res.items()} for res, _ in runs]
    print(json.dumps(out))


if __name__ == "__main__":
    main()

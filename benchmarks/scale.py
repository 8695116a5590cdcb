"""Many clients, few per round: memory of the whole job and seconds per round on Ray.

10,000 clients at 1% participation (100 per round) against 1,000 clients at 10% (the same 100 per
round), each client holding the same amount of data (6 images x 5 captions of 512-d features on
average), RCSR at preset S4, Ray packed client actors. Round time should follow the participants per
round, not the total number of clients.

Memory is the peak of the sum of PSS (proportional set size: shared pages split between the
processes sharing them) over this process and all its descendants, which are all of Ray's own
processes (GCS, raylet, dashboard agents, workers) since this process starts the Ray instance. It is
sampled every 0.5 s, from building the federation to the last round; the embedded benchmark's data
is generated (and cached) before, as a feature store would be encoded before a real run.

    python benchmarks/scale.py [--clients 10000] [--small-clients 1000] [--participants 100] [--rounds 6]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

from pathlib import Path

from round_overhead import Run, smaps_rollup_kb

from rcsr_ray.config import load_config
from rcsr_ray.data.federation import open_store

IMAGES_PER_CLIENT = 6


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def job_pss() -> dict[str, int]:
    """PSS bytes of this process and each descendant (Linux: /proc/PID/smaps_rollup), by process title."""
    out: dict[str, int] = {}
    for pid in _descendants(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            out[f"{pid} {Path(title).name[:40]}"] = smaps_rollup_kb(pid)["Pss"] * 1024
        except OSError:
            pass  # the process ended
    return out


class PeakPSS:
    """Samples the job's PSS in a background thread; `peak` is the largest sum seen."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.peak, self.at_peak, self._stop = every_s, 0, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        now = job_pss()
        if sum(now.values()) > self.peak:
            self.peak, self.at_peak = sum(now.values()), now

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    def top(self, n: int = 6) -> str:
        biggest = sorted(self.at_peak.items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{name} {b / 2**30:.2f}" for name, b in biggest)


def workload(clients: int, participants: int) -> dict:
    return {"preset": "S4", "fed.method": "rcsr", "partition.num_clients": clients,
            "fed.participation": participants / clients, "partition.min_samples": 2,
            "data.synthetic.train_images": clients * IMAGES_PER_CLIENT, "runtime.backend": "ray"}


def history_gb(run: Run) -> float:
    """RCSR's per-client update history (rcsr.history_dims) once every client has taken part, in GB:
    a short run samples a few of them, a long one all."""
    history = run.strategy.history
    per_client = (history.dims or run.params.numel()) * 4
    return per_client * run.fed.num_clients / 2**30


def measure(clients: int, participants: int, rounds: int, warmup: int) -> tuple[float, float, float, float]:
    open_store(load_config(overrides=workload(clients, participants)))  # generated once, then cached
    t0 = time.perf_counter()
    with PeakPSS() as pss:
        run = Run(workload(clients, participants))
        try:
            for r in range(1, rounds + 1):
                run.round(r)
        finally:
            run.backend.shutdown()
        sec = statistics.median(run.times[warmup:])
    print(f"{clients} clients, largest processes at peak (GB): {pss.top()}")
    return sec, pss.peak / 2**30, time.perf_counter() - t0, history_gb(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--small-clients", type=int, default=1000)
    ap.add_argument("--participants", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    from rcsr_ray.runtime.connect import start_local_ray

    start_local_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)
    baseline = sum(job_pss().values()) / 2**30  # Ray's daemons and this process before any run
    small = measure(args.small_clients, args.participants, args.rounds, args.warmup)
    large = measure(args.clients, args.participants, args.rounds, args.warmup)
    ray.shutdown()
    print(f"Ray idle (daemons + this process): {baseline:.2f} GB PSS")
    print(f"{'clients':>8}{'per round':>11}{'s/round':>9}{'peak PSS GB':>13}{'wall s':>8}{'history GB':>12}")
    for n, (sec, gb, wall, hist) in ((args.small_clients, small), (args.clients, large)):
        print(f"{n:>8}{args.participants:>11}{sec:>9.3f}{gb:>13.2f}{wall:>8.1f}{hist:>12.2f}")
    print("history GB: the server's record of each client's previous update once every client has taken part "
          "(rcsr.history_dims); the peak already holds the sampled clients' part, so peak + history bounds a long run")
    print(f"s/round ratio {args.clients} vs {args.small_clients} clients: {large[0] / small[0]:.2f}")
    print(json.dumps({"clients": args.clients, "participants": args.participants,
                      "sec_per_round": round(large[0], 4), "peak_pss_gb": round(large[1], 3),
                      "small_clients": args.small_clients, "small_sec_per_round": round(small[0], 4),
                      "small_peak_pss_gb": round(small[1], 3), "idle_pss_gb": round(baseline, 3),
                      "history_gb_all_clients": round(large[3], 3), "small_history_gb_all_clients": round(small[3], 3)}))


if __name__ == "__main__":
    main()

"""How much two busy cores slow client updates on this machine, with no Ray at all.

Two plain processes each run half of every round's sampled clients (as two packed actors would) on
the local backend, once one after the other ("alone") and once both at the same time ("at once"),
in alternating order round by round. The ratio of their update CPU (at once / alone) is the part of
`round_overhead.py`'s `updates` column that the machine, not the runtime, causes: on this VM it
moves between runs with the host's load.

    python benchmarks/contention.py [--workload peer|rcsr] [--rounds 10] [--warmup 2]

Last line: one JSON object, keys `workload`, `rounds`, `cpu_ratio`, `wall_ratio` (medians over
both processes' rounds after warm-up) and `alone_cpu_ms`, `at_once_cpu_ms` (per process and round).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

from round_overhead import PEER, RCSR_S4, Run

WORKLOADS = {"peer": PEER, "rcsr": RCSR_S4}


def _half(run: Run, r: int, index: int):
    """Round r's work for process `index`: every other sampled client, from its own."""
    sampled = run.strategy.sample(r, run.fed.num_clients)
    return (run.strategy.broadcast(r, run.params), sampled[index::2], run.strategy.client_settings(r))


def _timed(run: Run, r: int, work) -> tuple[float, float]:
    """Update CPU seconds and wall seconds of one half-round."""
    state, clients, settings = work
    cpu, wall = run.update_cpu_s(), time.perf_counter()
    run.backend.train(state, clients, settings, run.cfg.seed, r)
    return run.update_cpu_s() - cpu, time.perf_counter() - wall


def worker(index: int, keys: dict, rounds: int, barrier, results) -> None:
    run = Run({**keys, "runtime.backend": "local"})
    for r in range(1, rounds + 1):
        work = _half(run, r, index)
        for mode in ("alone", "at once") if r % 2 else ("at once", "alone"):
            turns = (0, 1) if mode == "alone" else (index,)
            for turn in turns:  # alone: each process in turn while the other waits
                barrier.wait()
                if turn == index:
                    results.put((index, r, mode, *_timed(run, r, work)))
                barrier.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="peer")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    if args.rounds <= args.warmup:
        ap.error(f"--rounds ({args.rounds}) must exceed --warmup ({args.warmup})")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(i, WORKLOADS[args.workload], args.rounds, barrier, results))
             for i in range(2)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(4 * args.rounds):  # per process and round: alone and at once
        index, r, mode, cpu, wall = results.get(timeout=600)
        got[index, r, mode] = (cpu, wall)
    for p in procs:
        p.join()
    kept = [(i, r) for i in range(2) for r in range(args.warmup + 1, args.rounds + 1)]
    alone = [got[i, r, "alone"] for i, r in kept]
    at_once = [got[i, r, "at once"] for i, r in kept]
    cpu_ratio = statistics.median(b[0] / a[0] for a, b in zip(alone, at_once))
    wall_ratio = statistics.median(b[1] / a[1] for a, b in zip(alone, at_once))
    alone_ms, at_once_ms = (1000 * statistics.median(x[0] for x in xs) for xs in (alone, at_once))
    print(f"{args.workload} workload, half a round per process, {len(kept)} process-rounds after warm-up")
    print(f"{'':10}{'update CPU ms':>15}{'ratio':>8}")
    print(f"{'alone':10}{alone_ms:>15.0f}{1:>8.2f}")
    print(f"{'at once':10}{at_once_ms:>15.0f}{cpu_ratio:>8.3f}   (wall ratio {wall_ratio:.3f})")
    print(json.dumps({"workload": args.workload, "rounds": args.rounds, "cpu_ratio": round(cpu_ratio, 3),
                      "wall_ratio": round(wall_ratio, 3), "alone_cpu_ms": round(alone_ms, 1),
                      "at_once_cpu_ms": round(at_once_ms, 1)}))


if __name__ == "__main__":
    main()

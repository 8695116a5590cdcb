"""rcsr-ray against pfl-research 0.6.0 on the peer workload, on this machine, in one command.

The issue that set the 0.6x target quotes figures measured on this kind of machine on another day
(a plain loop 0.44 s/round, pfl-research with 2 worker processes 0.26). This VM's speed drifts by
up to 1.5x within a minute, so those figures cannot be set against ours measured today. This script
measures both simulators here, in alternating blocks:

- rcsr-ray's local backend and Ray packed (2 actors), alternating round by round
  (`round_overhead.seconds_per_round`);
- pfl-research with one process, and with 2 worker processes (torchrun, gloo on 127.0.0.1).

The pfl side runs the same workload on the same rows: FedAvg, 100 clients of the synthetic store,
50 per round, 1 local epoch, batch 128 images with one random caption each, InfoNCE at logit
scale 20, a fresh torch AdamW (lr 1e-3, rcsr-ray's weight decay) per client, and rcsr-ray's own
bottleneck-64 adapters (`ResidualAdapter`, with its hand-written backward), so that what differs is
the simulator: pfl's model and optimizer handling, its processes and its all-reduce, against
rcsr-ray's flat-buffer client update, actors, driver and shared memory.

pfl is no dependency of rcsr-ray. `--install-pfl` installs it and the few packages it imports, from
PyPI, into `--pfl-path` (default ~/.cache/rcsr-ray/pfl-0.6.0, about 150 MB), beside this venv's torch.

    python benchmarks/peers.py [--install-pfl] [--rounds 16] [--warmup 3] [--repeats 3]

Last line: one JSON object: `local_s`, `ray_packed_s`, `ratio_packed` (ours), `pfl_1_s`, `pfl_2_s`,
`pfl_ratio` (pfl 2 workers / 1 process), `ray_over_pfl_2` and `local_over_pfl_1` (ours / pfl's,
below 1 where rcsr-ray is faster), medians over the repeats (a ratio's median is over each repeat's
ratio), plus each repeat's figures under "runs".
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PFL_PATH = Path.home() / ".cache" / "rcsr-ray" / "pfl-0.6.0"
# pfl 0.6.0 and what it imports that this venv lacks; torch and numpy are this venv's own.
PFL_PACKAGES = ["pfl==0.6.0", "dp-accounting==0.5.1", "prv-accountant==0.2.0", "multiprocess==0.70.19",
                "dill==0.4.1", "absl-py==2.5.1", "scipy==1.17.1"]


# ---------------------------------------------------------------------------------------------
# The pfl side: run under this script's own process (1 worker) or torchrun (2 workers)


def pfl_worker(rounds: int) -> None:
    """The peer workload on pfl-research; rank 0 prints {"workers", "round_s"} as its last line."""
    import numpy as np
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.internal.ops.selector import get_framework_module
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel
    from torch import nn

    from rcsr_ray.config import load_config
    from rcsr_ray.data.federation import build_federation
    from rcsr_ray.fl.client import info_nce
    from rcsr_ray.models.adapters import ResidualAdapter
    from round_overhead import PEER

    cfg = load_config(overrides=PEER)

    class PeerAdapters(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(cfg.seed)
            dim, bottleneck = 512, cfg.model.adapter.bottleneck
            self.image = ResidualAdapter(dim, bottleneck, 0.0, g)
            self.text = ResidualAdapter(dim, bottleneck, 0.0, g)

        def loss(self, images, captions):  # captions: (n, 5, dim); one at random per image
            pick = torch.randint(captions.shape[1], (len(images),))
            txt = captions[torch.arange(len(images)), pick]
            return info_nce(self.image(images), self.text(txt), cfg.train.temperature)

        @torch.no_grad()
        def metrics(self, images, captions):
            return {"loss": Weighted.from_unweighted(float(self.loss(images, captions)))}

    class Stamps(TrainingProcessCallback):
        def __init__(self):
            self.at = [time.perf_counter()]

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            self.at.append(time.perf_counter())
            return False, Metrics()

    torch.set_num_threads(1)
    torch.manual_seed(int(os.environ.get("RANK", "0")))
    fed = build_federation(cfg)
    users = {}
    for c in range(fed.num_clients):
        s = fed.shard(c)
        per_image = int(np.diff(s.caption_offsets)[0])
        users[c] = [torch.from_numpy(np.ascontiguousarray(s.image_emb)),
                    torch.from_numpy(np.ascontiguousarray(s.caption_emb)).reshape(len(s.image_emb), per_image, -1)]
    data = FederatedDataset(lambda uid: Dataset(raw_data=users[uid], user_id=uid),
                            get_user_sampler("minimize_reuse", list(users)))
    module = PeerAdapters()
    decay = cfg.train.weight_decay  # torch's AdamW would default to 0.01
    model = PyTorchModel(model=module, local_optimizer_create=lambda params, lr: torch.optim.AdamW(
                             params, lr=lr, weight_decay=decay),
                         central_optimizer=torch.optim.SGD(module.parameters(), 1.0))  # FedAvg: theta += mean delta
    stamps = Stamps()
    cohort = int(cfg.fed.participation * fed.num_clients)
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=10**9,
                                           train_cohort_size=cohort, val_cohort_size=0),
        backend=SimulatedBackend(training_data=data, val_data=data, postprocessors=[]), model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=cfg.train.lr, local_num_epochs=1,
                                              local_batch_size=cfg.train.batch_size),
        model_eval_params=NNEvalHyperParams(local_batch_size=1024), callbacks=[stamps])
    dist = get_framework_module().distributed
    if dist.global_rank == 0:
        print(json.dumps({"workers": dist.world_size, "round_s": [b - a for a, b in zip(stamps.at, stamps.at[1:])]}))


# ---------------------------------------------------------------------------------------------
# The driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pfl_seconds(workers: int, rounds: int, warmup: int, pfl_path: Path) -> float:
    """Median s/round of pfl-research with `workers` processes, after `warmup` rounds."""
    script = [str(Path(__file__).resolve()), "--pfl-worker", "--rounds", str(rounds)]
    if workers == 1:
        cmd = [sys.executable, *script]
    else:  # torchrun's static rendezvous, on loopback only
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(workers),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *script]
    path = [str(pfl_path), str(HERE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path),
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"workers"')]
    if done.returncode or not lines:
        raise RuntimeError(f"pfl with {workers} worker(s) failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    got = json.loads(lines[-1])
    if got["workers"] != workers or len(got["round_s"]) != rounds:
        raise RuntimeError(f"pfl ran {got['workers']} worker(s) and {len(got['round_s'])} rounds, "
                           f"expected {workers} and {rounds}")
    return statistics.median(got["round_s"][warmup:])


def ours_seconds(rounds: int, warmup: int) -> tuple[float, float]:
    """Median s/round of rcsr-ray's local backend and Ray packed; Ray is started for this block only,
    so that its idle daemons do not run beside pfl."""
    import ray

    from rcsr_ray.runtime.connect import start_local_ray
    from round_overhead import PEER, seconds_per_round
    start_local_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        local_s, ray_s, identical, *_ = seconds_per_round(PEER, {**PEER, "runtime.backend": "ray"}, rounds, warmup)
    finally:
        ray.shutdown()
    if not identical:
        raise RuntimeError("rcsr-ray's local and Ray runs ended with different adapters")
    return local_s, ray_s


def install_pfl(path: Path) -> None:
    print(f"installing {', '.join(PFL_PACKAGES)} into {path}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(path),
                    *PFL_PACKAGES], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="alternating blocks of both simulators")
    ap.add_argument("--pfl-path", type=Path, default=PFL_PATH, help="where pfl-research is installed")
    ap.add_argument("--install-pfl", action="store_true", help="install pfl-research there first (from PyPI)")
    ap.add_argument("--pfl-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1:  # pfl's first round also holds its set-up and an evaluation of round 0
        ap.error(f"--warmup must be at least 1, got {args.warmup}")
    if args.rounds <= args.warmup:
        ap.error(f"--rounds ({args.rounds}) must exceed --warmup ({args.warmup})")
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.pfl_worker:
        pfl_worker(args.rounds)
        return
    if args.install_pfl:
        install_pfl(args.pfl_path)
    if not (args.pfl_path / "pfl" / "__init__.py").exists():
        sys.exit(f"pfl-research is not installed in {args.pfl_path}: run this script with --install-pfl "
                 "(or name another folder with --pfl-path)")
    runs = []
    for i in range(args.repeats):
        # Alternate which simulator goes first, so neither always meets the same stretch of the VM.
        blocks = ["ours", "pfl"] if i % 2 == 0 else ["pfl", "ours"]
        run = {}
        for block in blocks:
            if block == "ours":
                run["local_s"], run["ray_packed_s"] = ours_seconds(args.rounds, args.warmup)
            else:
                run["pfl_1_s"] = pfl_seconds(1, args.rounds, args.warmup, args.pfl_path)
                run["pfl_2_s"] = pfl_seconds(2, args.rounds, args.warmup, args.pfl_path)
        run["ratio_packed"] = run["ray_packed_s"] / run["local_s"]
        run["pfl_ratio"] = run["pfl_2_s"] / run["pfl_1_s"]
        run["ray_over_pfl_2"] = run["ray_packed_s"] / run["pfl_2_s"]
        run["local_over_pfl_1"] = run["local_s"] / run["pfl_1_s"]
        runs.append({k: round(v, 4) for k, v in run.items()})
        print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[-1].items()), flush=True)
    med = {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}
    what = f"medians of {args.repeats} repeats" if args.repeats > 1 else "one repeat"
    print(f"\npeer workload, s/round ({what})   one process   2 workers   2 workers / one")
    print(f"{'rcsr-ray (local; Ray packed)':<34}{med['local_s']:>12.3f}{med['ray_packed_s']:>12.3f}"
          f"{med['ratio_packed']:>18.3f}")
    print(f"{'pfl-research 0.6.0 (torchrun)':<34}{med['pfl_1_s']:>12.3f}{med['pfl_2_s']:>12.3f}"
          f"{med['pfl_ratio']:>18.3f}")
    print(f"{'rcsr-ray / pfl-research':<34}{med['local_over_pfl_1']:>12.3f}{med['ray_over_pfl_2']:>12.3f}")
    print(json.dumps({**med, "repeats": args.repeats, "runs": runs}))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))  # round_overhead, for the workload's keys
    main()

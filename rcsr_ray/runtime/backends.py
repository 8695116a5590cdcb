"""The local backend: every client update runs serially in this process.

Backends share one interface: `train(...) -> (updates sorted by client id, failed client ids)`,
`evaluate_local`, `client_state` / `load_client_state` (checkpoints) and `shutdown`.
"""
from __future__ import annotations

import numpy as np

from rcsr_ray.config import Config, parse_faults
from rcsr_ray.fl.client import ClientSettings, ClientUpdate, ClientWorker, GlobalState
from rcsr_ray.runtime.faults import run_clients, split_results


class LocalBackend:
    name = "local"

    def __init__(self, federation, cfg: Config):
        self.worker = ClientWorker(federation, cfg.model.adapter.bottleneck, cfg.runtime.torch_threads)
        self.faults = parse_faults(cfg.runtime.faults)

    def train(self, state: GlobalState, clients: np.ndarray, settings: ClientSettings, seed: int,
              round_idx: int, attempt: int = 0) -> tuple[list[ClientUpdate], list[int]]:
        return split_results(run_clients(self.worker, clients, state, settings, seed, round_idx, attempt,
                                         self.faults, in_process=True))

    def client_state(self) -> dict[int, dict]:
        return dict(self.worker.state)

    def load_client_state(self, states: dict[int, dict]) -> None:
        for c, s in states.items():
            self.worker.shard(c)
            self.worker.state[c] = s

    def evaluate_local(self, params, clients) -> list[dict]:
        return [self.worker.evaluate_local(int(c), params) for c in clients]

    def shutdown(self) -> None:
        pass


def make_backend(federation, cfg: Config, run_name: str | None = None):
    if cfg.runtime.backend == "local":
        return LocalBackend(federation, cfg)
    from rcsr_ray.runtime.ray_backend import RayBackend  # Ray is imported only when asked for

    return RayBackend(federation, cfg, run_name)

"""The local backend: every client update runs serially in this process."""
from __future__ import annotations

import numpy as np
from rcsr_ray.config import Config
from rcsr_ray.fl.client import ClientSettings, ClientUpdate, ClientWorker, GlobalState


class LocalBackend:
    name = "local"

    def __init__(self, federation, cfg: Config):
        self.worker = ClientWorker(federation, cfg.model.adapter.bottleneck, cfg.runtime.torch_threads)

    def train(self, state: GlobalState, clients: np.ndarray, settings: ClientSettings, seed: int,
              round_idx: int) -> list[ClientUpdate]:
        return [self.worker.update(int(c), state, settings, seed, round_idx) for c in clients]

    def evaluate_local(self, params, clients) -> list[dict]:
        return [self.worker.evaluate_local(int(c), params) for c in clients]

    def shutdown(self) -> None:
        pass


def make_backend(federation, cfg: Config):
    if cfg.runtime.backend == "local":
        return LocalBackend(federation, cfg)
    from rcsr_ray.runtime.ray_backend import RayBackend  # Ray is imported only when asked for

    return RayBackend(federation, cfg)

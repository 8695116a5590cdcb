"""The Ray backend: client actors that run the same client update as the local backend.

Clients are assigned to actors in contiguous blocks; an actor reads its clients' rows from the
feature store (memmaps, shared through the page cache) once and keeps them. The global adapters go
through the object store once per round (`ray.put`), not once per client.
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np
import ray
import torch

from rcsr_ray.config import Config
from rcsr_ray.fl.client import ClientSettings, ClientUpdate, ClientWorker, GlobalState

log = logging.getLogger(__name__)


def ensure_ray(cfg: Config) -> None:
    """Join the cluster named by runtime.address / RAY_ADDRESS, else start a local instance on 127.0.0.1."""
    if ray.is_initialized():
        return
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(num_cpus=cfg.runtime.num_cpus, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
             include_dashboard=False, log_to_driver=True, configure_logging=False)


@ray.remote
class ClientActor:
    def __init__(self, federation, bottleneck: int, torch_threads: int):
        torch.set_num_threads(torch_threads)
        self.worker = ClientWorker(federation, bottleneck, torch_threads)

    def train(self, state: GlobalState, clients: list[int], settings: ClientSettings, seed: int,
              round_idx: int) -> list[ClientUpdate]:
        return [self.worker.update(c, state, settings, seed, round_idx) for c in clients]

    def evaluate_local(self, params: torch.Tensor, clients: list[int]) -> list[dict]:
        return [self.worker.evaluate_local(c, params) for c in clients]


def plan_actors(num_clients: int, cluster_cpus: float, client_cpus: float, clients_per_actor: int | None) -> int:
    """Clients per actor: as asked, else one per actor while the cluster's CPUs allow, else packed."""
    if clients_per_actor:
        return min(clients_per_actor, num_clients)
    slots = max(1, int(cluster_cpus // client_cpus))
    return math.ceil(num_clients / min(slots, num_clients))


class RayBackend:
    name = "ray"

    def __init__(self, federation, cfg: Config):
        ensure_ray(cfg)
        rt = cfg.runtime
        n = federation.num_clients
        self.per_actor = plan_actors(n, ray.cluster_resources().get("CPU", 1), rt.client_cpus, rt.clients_per_actor)
        self.actors = []
        for first in range(0, n, self.per_actor):
            last = min(first + self.per_actor, n) - 1
            name = f"rcsr-client-{first}" if first == last else f"rcsr-clients-{first}-{last}"
            self.actors.append(ClientActor.options(name=name, num_cpus=rt.client_cpus).remote(
                federation, cfg.model.adapter.bottleneck, rt.torch_threads))

    def train(self, state: GlobalState, clients: np.ndarray, settings: ClientSettings, seed: int,
              round_idx: int) -> list[ClientUpdate]:
        state_ref = ray.put(state)
        futures = [self.actors[a].train.remote(state_ref, cs, settings, seed, round_idx)
                   for a, cs in self._by_actor(clients)]
        updates = [u for batch in ray.get(futures) for u in batch]
        return sorted(updates, key=lambda u: u.client_id)

    def evaluate_local(self, params: torch.Tensor, clients) -> list[dict]:
        """Personal retrieval, evaluated where the personal adapters live; results in the order given."""
        params_ref = ray.put(params)
        groups = self._by_actor(clients)
        results = ray.get([self.actors[a].evaluate_local.remote(params_ref, cs) for a, cs in groups])
        by_client = {c: m for (_, cs), ms in zip(groups, results) for c, m in zip(cs, ms)}
        return [by_client[int(c)] for c in clients]

    def _by_actor(self, clients) -> list[tuple[int, list[int]]]:
        groups: dict[int, list[int]] = {}
        for c in clients:
            groups.setdefault(int(c) // self.per_actor, []).append(int(c))
        return sorted(groups.items())

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []

"""Server strategies: one method per round phase (sample, configure, aggregate).

A strategy is a plain object; the runtime's round loop calls it the same way on every backend.
Client results always arrive sorted by client id, so aggregation never depends on arrival order.
"""
from __future__ import annotations

import copy
import logging
import math

import numpy as np
import torch

from rcsr_ray.config import Config
from rcsr_ray.fl.client import ClientSettings, ClientUpdate, GlobalState, torch_threads

log = logging.getLogger(__name__)


def sample_clients(seed: int, round_idx: int, num_clients: int, participation: float) -> np.ndarray:
    """The round's participants, sorted, from a generator seeded by (seed, round) alone."""
    m = max(1, int(round(participation * num_clients)))
    rng = np.random.default_rng([seed, round_idx, 0x5A3])
    return np.sort(rng.choice(num_clients, size=m, replace=False))


class FedAvg:
    """theta <- theta + sum_k w_k delta_k, w proportional to each trained client's sample count."""

    name = "fedavg"
    client_mode = "global"
    trains = True
    personal = False  # clients keep personal adapters (evaluated on the clients, never sent)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rejected_total = 0

    def sample(self, round_idx: int, num_clients: int) -> np.ndarray:
        return sample_clients(self.cfg.seed, round_idx, num_clients, self.cfg.fed.participation)

    def client_settings(self, round_idx: int) -> ClientSettings:
        return ClientSettings.from_config(self.cfg, self.client_mode)

    def broadcast(self, round_idx: int, params: torch.Tensor) -> GlobalState:
        return GlobalState(params)

    def accepted(self, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """Updates that can be aggregated; a non-finite one is rejected, logged and counted."""
        keep = []
        for u in updates:
            if u.delta is None:
                continue
            # A NaN or inf anywhere makes the sum non-finite (so would an overflowing sum: equally
            # unusable); one reduction instead of an elementwise test and a second one.
            if not math.isfinite(float(u.delta.sum())):
                self.rejected_total += 1
                log.warning("client %d sent a non-finite (or overflowing) update; rejected", u.client_id)
                continue
            keep.append(u)
        return keep

    def weights(self, updates: list[ClientUpdate]) -> torch.Tensor:
        n = torch.tensor([u.num_samples for u in updates], dtype=torch.float64)
        return n / n.sum()

    def state_dict(self) -> dict:
        """Everything the strategy carries across rounds, for a checkpoint to write at once: the live
        objects, not copies (a deep copy would double the largest of them, RCSR's record of previous
        updates up to 1 GiB or the local method's adapters of every client, only to be pickled).
        `load_state_dict` copies what it is given."""
        return {k: v for k, v in vars(self).items() if k != "cfg"}

    def load_state_dict(self, state: dict, copy_state: bool = True) -> None:
        """Take over `state` (a copy of it, unless `copy_state` is False: a state just read from a
        checkpoint belongs to nobody else, and copying it would double it for a moment)."""
        vars(self).update(copy.deepcopy(state) if copy_state else state)

    def round_metrics(self, ok: list[ClientUpdate]) -> dict:
        return {"trained_clients": len(ok), "rejected_updates": self.rejected_total,
                "train_loss": float(np.mean([u.loss for u in ok])) if ok else float("nan")}

    @staticmethod
    def apply(params: torch.Tensor, w: torch.Tensor, ok: list[ClientUpdate]) -> torch.Tensor:
        """theta + sum_k w_k delta_k, summed in float64 in client-id order (deterministic)."""
        step = torch.zeros_like(params, dtype=torch.float64)
        for wk, u in zip(w.tolist(), ok):
            step.add_(u.delta, alpha=wk)  # one call per client, accumulated in float64
        return params + step.to(params.dtype)

    def aggregate(self, round_idx: int, params: torch.Tensor, updates: list[ClientUpdate]) -> tuple[torch.Tensor, dict]:
        ok = self.accepted(updates)
        return (self.apply(params, self.weights(ok), ok) if ok else params), self.round_metrics(ok)

    def server_step(self, round_idx: int, params: torch.Tensor, updates: list[ClientUpdate]) -> tuple[torch.Tensor, dict]:
        """`aggregate` on `runtime.server_threads` threads, as the round loop runs it: the same numbers
        in any process on any machine (a CLI run, a driver actor, a Tune trial), and no idle
        intra-op threads spinning beside the client workers."""
        with torch_threads(self.cfg.runtime.server_threads):
            return self.aggregate(round_idx, params, updates)


class FedProx(FedAvg):
    """FedAvg plus a proximal term (fed.prox_mu) toward the global adapters in the client loss."""

    name = "fedprox"

    def client_settings(self, round_idx: int) -> ClientSettings:
        return ClientSettings.from_config(self.cfg, self.client_mode, prox_mu=self.cfg.fed.prox_mu)


class Moon(FedAvg):
    """FedAvg plus MOON's model-contrastive term against the global and the previous local model."""

    name = "moon"

    def client_settings(self, round_idx: int) -> ClientSettings:
        f = self.cfg.fed
        return ClientSettings.from_config(self.cfg, self.client_mode, moon_mu=f.moon_mu,
                                          moon_temperature=f.moon_temperature)


class FedPer(FedAvg):
    """Shared adapters federated as in FedAvg; personal adapters on top, trained and kept on each client."""

    name = "fedper"
    personal = True

    def client_settings(self, round_idx: int) -> ClientSettings:
        return ClientSettings.from_config(self.cfg, self.client_mode, personal=True)


class Local(FedAvg):
    """Each client trains alone from its own adapters; nothing is aggregated."""

    name = "local"
    client_mode = "local"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.client_params: dict[int, torch.Tensor] = {}

    def aggregate(self, round_idx, params, updates):
        ok = self.accepted(updates)
        for u in ok:
            self.client_params[u.client_id] = u.params
        return params, self.round_metrics(ok)


class Central(FedAvg):
    """All training data pooled into one client that takes part in every round."""

    name = "central"

    def sample(self, round_idx: int, num_clients: int) -> np.ndarray:
        return np.arange(num_clients)


class ZeroShot(FedAvg):
    name = "zeroshot"
    trains = False


STRATEGIES = {cls.name: cls for cls in (FedAvg, FedProx, Moon, FedPer, Local, Central, ZeroShot)}


def training_rounds(cfg: Config) -> int:
    """The rounds a run of `cfg` trains: fed.rounds, or 0 for a method that does not train (zero-shot)."""
    trains = cfg.fed.method == "rcsr" or STRATEGIES[cfg.fed.method].trains  # RCSR: imported when made
    return cfg.fed.rounds if trains else 0


def make_strategy(cfg: Config, num_clients: int, num_clusters: int, dim: int):
    if cfg.fed.method == "rcsr":
        from rcsr_ray.fl.rcsr import RCSR

        return RCSR(cfg, num_clients, num_clusters, dim)
    return STRATEGIES[cfg.fed.method](cfg)

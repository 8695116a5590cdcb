"""The client update: a plain function of (global state, client data, settings, seed).

Both backends call `ClientWorker.update`; each worker keeps one adapter model and swaps weights in
place per client, so nothing is rebuilt per client or per round.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from rcsr_ray.config import Config
from rcsr_ray.data.federation import ClientShard
from rcsr_ray.data.partition import PAIRED
from rcsr_ray.models.adapters import AdapterPair


@dataclass(frozen=True)
class ClientSettings:
    local_epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    temperature: float
    prox_mu: float = 0.0
    # "global": start from the global adapters and send back a delta; "local": start from the
    # client's own adapters kept on the worker and send back those (the local-only baseline).
    mode: str = "global"

    @classmethod
    def from_config(cls, cfg: Config, mode: str = "global") -> "ClientSettings":
        t = cfg.train
        return cls(t.local_epochs, t.batch_size, t.lr, t.weight_decay, t.temperature, cfg.fed.prox_mu, mode)


@dataclass
class ClientUpdate:
    client_id: int
    modality: int
    num_samples: int
    delta: torch.Tensor | None  # None: the client had nothing it could train on
    loss: float = float("nan")
    steps: int = 0
    params: torch.Tensor | None = None  # only in "local" mode
    metrics: dict = field(default_factory=dict)


def client_seed(seed: int, round_idx: int, client: int) -> int:
    """Each client's randomness depends only on (seed, round, client id), never on scheduling."""
    return int(np.random.SeedSequence([seed, round_idx, client]).generate_state(1, np.uint64)[0] >> 1)


def info_nce(img: torch.Tensor, txt: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = img @ txt.T / temperature
    labels = torch.arange(len(img))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class ClientWorker:
    """Holds one adapter model and the shards of the clients it serves, plus their private state."""

    def __init__(self, federation, bottleneck: int, torch_threads: int = 1):
        self.federation = federation  # anything with .shard(client) -> ClientShard
        self.model = AdapterPair(federation.store.dim, bottleneck)
        self.torch_threads = torch_threads
        self.shards: dict[int, ClientShard] = {}
        self.state: dict[int, dict] = {}  # per client, never sent to the server

    def shard(self, client: int) -> ClientShard:
        """The client's data, read from the feature store on first use and then kept."""
        if client not in self.shards:
            self.shards[client] = self.federation.shard(client)
            self.state[client] = {}
        return self.shards[client]

    def update(self, client: int, global_params: torch.Tensor, settings: ClientSettings, seed: int,
               round_idx: int) -> ClientUpdate:
        shard = self.shard(client)
        if shard.modality != PAIRED or shard.num_images < 2:
            # Without both modalities there is no contrastive signal: the client sits this round out.
            return ClientUpdate(client, shard.modality, shard.num_images, None)
        state = self.state[client]
        start = state.get("params", global_params) if settings.mode == "local" else global_params
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        try:
            loss, steps = self._train(start, global_params, shard, settings, client_seed(seed, round_idx, client))
        finally:
            torch.set_num_threads(prev_threads)
        new = self.model.flat.detach().clone()
        if settings.mode == "local":
            state["params"] = new
            return ClientUpdate(client, shard.modality, shard.num_images, new - start, loss, steps, params=new)
        return ClientUpdate(client, shard.modality, shard.num_images, new - global_params, loss, steps)

    def _train(self, start, global_params, shard: ClientShard, s: ClientSettings, seed: int) -> tuple[float, int]:
        model = self.model
        model.load_flat(start)
        params = list(model.parameters())
        anchors = _views_like(global_params, params) if s.prox_mu > 0 else None
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        g = torch.Generator().manual_seed(seed)
        images = torch.from_numpy(shard.image_emb)
        captions = torch.from_numpy(shard.caption_emb)
        offsets = torch.from_numpy(shard.caption_offsets)
        counts = offsets[1:] - offsets[:-1]
        n, total, steps = shard.num_images, 0.0, 0
        for _ in range(s.local_epochs):
            perm = torch.randperm(n, generator=g)
            for b in range(0, n, s.batch_size):
                idx = perm[b:b + s.batch_size]
                if len(idx) < 2:
                    continue
                pick = offsets[idx] + (torch.rand(len(idx), generator=g) * counts[idx]).long()
                img, txt = model.encode(images[idx], captions[pick])
                loss = info_nce(img, txt, s.temperature)
                if s.prox_mu > 0:
                    loss = loss + 0.5 * s.prox_mu * sum((p - a).pow(2).sum() for p, a in zip(params, anchors))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
                steps += 1
        return total / max(steps, 1), steps


def _views_like(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    views, offset = [], 0
    for p in params:
        views.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return views

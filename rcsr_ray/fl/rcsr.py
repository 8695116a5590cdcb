"""The RCSR server strategy (METHOD.md, "Server step"): router, minimax fairness, fused aggregation,
EMA global prototypes, one router step per round. Each piece can be switched off (`rcsr.*`).
"""
from __future__ import annotations

import logging

import torch

from rcsr_ray.config import Config
from rcsr_ray.data.partition import MODALITY_NAMES
from rcsr_ray.fl.client import ClientSettings, ClientUpdate, GlobalState
from rcsr_ray.fl.rcsr_server import (GlobalPrototypes, RouterTrainer, client_alignment, fuse_weights,
                                     minimax_update, prototype_coherence, weight_entropy)
from rcsr_ray.fl.strategy import FedAvg
from rcsr_ray.models.router import SemanticRouter

log = logging.getLogger(__name__)

AUTO_HISTORY_BYTES = 2**30  # auto: exact previous updates while all clients' fit in this
AUTO_HISTORY_DIMS = 4096  # else count sketches of this many buckets (cosine within about +-0.02)


class UpdateHistory:
    """Each client's latest accepted update, for the cosine to its previous one (METHOD.md's update
    geometry). The server saw every update, so clients keep nothing for it.

    `dims` 0 keeps the update itself: 4 bytes a parameter a client, 5 GB for 10^4 clients of a
    bottleneck-64 adapter pair. `dims` k > 0 keeps a k-bucket count sketch (each parameter added,
    with a random sign, into one of k buckets; fixed by the seed): the dot product of two sketches
    is an unbiased estimate of the updates' dot product, with a standard deviation of about
    |a| |b| / sqrt(k). `dims` None decides at the first update: exact while every client's update
    fits in AUTO_HISTORY_BYTES."""

    def __init__(self, dims: int | None, num_clients: int, seed: int):
        self.dims, self.num_clients, self.seed = dims, num_clients, seed
        self.codes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # client -> (code, update norm)
        self.bucket = self.sign = None

    def _resolve(self, size: int) -> None:
        if self.dims is None:
            exact = self.num_clients * size * 4 <= AUTO_HISTORY_BYTES
            self.dims = 0 if exact else AUTO_HISTORY_DIMS
            if not exact:
                log.info("rcsr: %d clients x %d parameters: previous updates kept as %d-bucket sketches "
                         "(rcsr.history_dims=0 keeps them whole)", self.num_clients, size, self.dims)
        if self.dims and self.bucket is None:
            g = torch.Generator().manual_seed(self.seed)
            self.bucket = torch.randint(self.dims, (size,), generator=g)
            self.sign = torch.randint(2, (size,), generator=g).double().mul_(2).sub_(1)

    def code(self, delta: torch.Tensor) -> torch.Tensor:
        """What is kept of `delta`: itself, or its sketch."""
        self._resolve(delta.numel())
        if not self.dims:
            return delta
        return torch.bincount(self.bucket, weights=delta.double() * self.sign, minlength=self.dims).float()

    def cosine(self, client: int, code: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """Cosine between the update coded as `code` (norm `norm`) and the client's previous one; 0
        for a client's first update."""
        prev = self.codes.get(client)
        if prev is None:
            return norm.new_zeros(())
        # One dot product: both norms are known (F.cosine_similarity costs 20x more at this size).
        return (torch.dot(code, prev[0]) / (norm * prev[1]).clamp_min(1e-8)).clamp(-1.0, 1.0)

    def keep(self, client: int, code: torch.Tensor, norm: torch.Tensor) -> None:
        self.codes[client] = (code, norm)


class RCSR(FedAvg):
    name = "rcsr"

    def __init__(self, cfg: Config, num_clients: int, num_clusters: int, dim: int):
        super().__init__(cfg)
        r = cfg.rcsr
        self.personal = r.personal
        self.num_clusters = num_clusters
        self.prototypes = GlobalPrototypes(num_clusters, dim, r.proto_decay, r.granularity)
        self.q = torch.full((num_clients,), 1.0 / num_clients, dtype=torch.float64)
        self.router = RouterTrainer(dim, r.router_hidden, r.router_heads, r.router_blocks, seed=cfg.seed,
                                    lr=r.router_lr, b1=r.b1, b2=r.b2, b4=r.b4, b5=r.b5) if r.router else None
        self.diagnostics: list[dict] = []  # one row per participating client per round
        self.history = UpdateHistory(r.history_dims, num_clients, cfg.seed)

    def client_settings(self, round_idx: int) -> ClientSettings:
        r = self.cfg.rcsr
        return ClientSettings.from_config(self.cfg, self.client_mode, prox_mu=r.prox_mu,
                                          anchor_weight=r.anchor_weight if r.anchoring else 0.0,
                                          anchor_mode=r.anchor_mode, clip_anchor=r.clip_anchor, personal=r.personal,
                                          report_prototypes=True, num_clusters=self.num_clusters)

    def broadcast(self, round_idx: int, params: torch.Tensor) -> GlobalState:
        return GlobalState(params, self.prototypes.client_view() if self.cfg.rcsr.anchoring else None)

    def geometry(self, u: ClientUpdate, code: torch.Tensor) -> torch.Tensor:
        """METHOD.md's update geometry: the client's (norm, image share, norm / sqrt(n)) with the
        cosine to its previous update in third place (`code`: the update as the history keeps it)."""
        norm, image_share, per_sample = u.geometry
        return torch.stack([norm, image_share, self.history.cosine(u.client_id, code, norm), per_sample])

    def aggregate(self, round_idx: int, params: torch.Tensor, updates: list[ClientUpdate]) -> tuple[torch.Tensor, dict]:
        r = self.cfg.rcsr
        ok = self.accepted(updates)
        metrics = self.round_metrics(ok)
        if not ok:
            # Nobody could train yet (e.g. only unimodal clients before any prototype exists):
            # their prototypes still seed the global ones.
            reported = [u.prototypes for u in updates if u.prototypes]
            if reported:
                self.prototypes.update(reported, torch.ones(len(reported), dtype=torch.float64) / len(reported))
            return params, metrics
        protos = self.prototypes.gather([u.prototypes for u in ok])
        img_p, txt_p, has = self.prototypes.pool_clients(protos)
        codes = [self.history.code(u.delta) for u in ok]
        geometry = torch.stack([self.geometry(u, code) for u, code in zip(ok, codes)])
        for u, code in zip(ok, codes):
            self.history.keep(u.client_id, code, u.geometry[0])
        mask = has.float()  # the router's modality mask (image, text): what each client reported
        losses = torch.tensor([u.loss for u in ok], dtype=torch.float32)
        tokens = SemanticRouter.build_tokens(img_p, txt_p, geometry, mask, losses)
        k = len(ok)
        routed = self.router.route(tokens) if self.router else None
        router_w = routed.detach().double() if self.router else torch.full((k,), 1.0 / k, dtype=torch.float64)
        ids = torch.tensor([u.client_id for u in ok])
        if r.minimax:
            self.q = minimax_update(self.q, ids, losses.double(), r.minimax_eta, r.minimax_tau)
        w = fuse_weights(router_w, self.q[ids])
        params = self.apply(params, w, ok)
        self.prototypes.update(protos, w)
        if self.router:
            g_img, g_txt = self.prototypes.pooled()
            parts = self.router.step(tokens, img_p, txt_p, g_img, g_txt, client_alignment(img_p, txt_p),
                                     self.prototypes.global_align(), routed)
            metrics["router_loss"] = parts["loss"]
        else:
            metrics["router_loss"] = float("nan")
        metrics["weight_entropy"] = weight_entropy(w)
        metrics["prototype_coherence"] = prototype_coherence(img_p, txt_p, mask.bool())
        for wk, rk, u in zip(w.tolist(), router_w.tolist(), ok):
            self.diagnostics.append({"round": round_idx, "client": u.client_id, "modality": MODALITY_NAMES[u.modality],
                                     "fused_weight": wk, "router_weight": rk, "q": float(self.q[u.client_id]),
                                     "loss": u.loss})
        return params, metrics

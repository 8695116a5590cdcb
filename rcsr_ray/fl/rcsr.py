"""The RCSR server strategy (METHOD.md, "Server step"): router, minimax fairness, fused aggregation,
EMA global prototypes, one router step per round. Each piece can be switched off (`rcsr.*`).
"""
from __future__ import annotations

import torch

from rcsr_ray.config import Config
from rcsr_ray.fl.client import ClientSettings, ClientUpdate, GlobalState
from rcsr_ray.fl.rcsr_server import (GlobalPrototypes, RouterTrainer, client_alignment, fuse_weights,
                                     minimax_update, prototype_coherence, weight_entropy)
from rcsr_ray.fl.strategy import FedAvg
from rcsr_ray.models.router import SemanticRouter


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
        # Each client's latest accepted update and its norm, for the cosine to the previous update in
        # the router's geometry features; the server saw every update, so clients keep nothing for it.
        self.previous_update: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def client_settings(self, round_idx: int) -> ClientSettings:
        r = self.cfg.rcsr
        return ClientSettings.from_config(self.cfg, self.client_mode, prox_mu=r.prox_mu,
                                          anchor_weight=r.anchor_weight if r.anchoring else 0.0,
                                          anchor_mode=r.anchor_mode, clip_anchor=r.clip_anchor, personal=r.personal,
                                          report_prototypes=True, num_clusters=self.num_clusters)

    def broadcast(self, round_idx: int, params: torch.Tensor) -> GlobalState:
        return GlobalState(params, self.prototypes.client_view() if self.cfg.rcsr.anchoring else None)

    def geometry(self, u: ClientUpdate) -> torch.Tensor:
        """METHOD.md's update geometry: the client's (norm, image share, norm / sqrt(n)) with the
        cosine to its previous update in third place."""
        norm, image_share, per_sample = u.geometry
        prev = self.previous_update.get(u.client_id)
        # One dot product: both norms are known (F.cosine_similarity costs 20x more at this size).
        cos = torch.dot(u.delta, prev[0]) / (norm * prev[1]).clamp_min(1e-8) if prev is not None \
            else norm.new_zeros(())
        return torch.stack([norm, image_share, cos, per_sample])

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
        protos = [u.prototypes for u in ok]
        img_p, txt_p, has = self.prototypes.pool_clients(protos)
        geometry = torch.stack([self.geometry(u) for u in ok])
        self.previous_update.update((u.client_id, (u.delta, u.geometry[0])) for u in ok)
        mask = has.float()  # the router's modality mask (image, text): what each client reported
        losses = torch.tensor([u.loss for u in ok], dtype=torch.float32)
        tokens = SemanticRouter.build_tokens(img_p, txt_p, geometry, mask, losses)
        k = len(ok)
        router_w = self.router.weights(tokens).double() if self.router else torch.full((k,), 1.0 / k, dtype=torch.float64)
        ids = torch.tensor([u.client_id for u in ok])
        if r.minimax:
            self.q = minimax_update(self.q, ids, losses.double(), r.minimax_eta, r.minimax_tau)
        w = fuse_weights(router_w, self.q[ids])
        params = self.apply(params, w, ok)
        self.prototypes.update(protos, w)
        if self.router:
            g_img, g_txt = self.prototypes.pooled()
            parts = self.router.step(tokens, img_p, txt_p, g_img, g_txt, client_alignment(img_p, txt_p),
                                     self.prototypes.global_align())
            metrics["router_loss"] = parts["loss"]
        else:
            metrics["router_loss"] = float("nan")
        metrics["weight_entropy"] = weight_entropy(w)
        metrics["prototype_coherence"] = prototype_coherence(img_p, txt_p, mask.bool())
        for wk, rk, u in zip(w.tolist(), router_w.tolist(), ok):
            self.diagnostics.append({"round": round_idx, "client": u.client_id, "modality": u.modality,
                                     "fused_weight": wk, "router_weight": rk, "q": float(self.q[u.client_id]),
                                     "loss": u.loss})
        return params, metrics

"""Server-side state of RCSR (METHOD.md, "Server step"): minimax fairness weights, fused weights,
EMA global prototypes with the alignment direction, and the router with its training loss.

Plain torch; the strategy that drives a round lives elsewhere and calls these pieces.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcsr_ray.models.optim import ForeachAdam
from rcsr_ray.models.router import SemanticRouter

IMAGE, TEXT = 0, 1  # columns of the modality masks


# ---------------------------------------------------------------------------------------------
# Client weights


def minimax_update(q: torch.Tensor, participants, losses, eta: float = 0.1, tau: float = 0.1) -> torch.Tensor:
    """Fairness weights over all N clients: q_k <- q_k * exp(eta * loss_k) for participating k, then
    q <- q^(1/(1+tau)), renormalised to sum 1. Returns a new float64 tensor.

    A participant with a non-finite loss (it could not train) is treated as not participating: its
    q_k only gets the tempering. Computed in log space so a large loss cannot overflow exp().
    """
    q = torch.as_tensor(q, dtype=torch.float64)
    participants = torch.as_tensor(participants, dtype=torch.long).reshape(-1)
    losses = torch.as_tensor(losses, dtype=torch.float64).reshape(-1)
    if participants.numel() != losses.numel():
        raise ValueError(f"{participants.numel()} participants but {losses.numel()} losses")
    if participants.unique().numel() != participants.numel():
        raise ValueError("participants must be unique")
    finite = torch.isfinite(losses)
    log_q = torch.log(q)  # zero weights stay exactly zero (log 0 = -inf)
    log_q[participants[finite]] += eta * losses[finite]
    return torch.softmax(log_q / (1.0 + tau), dim=0)


def fuse_weights(router_w: torch.Tensor, q_part: torch.Tensor) -> torch.Tensor:
    """w = normalize(router_w * q_part) (sum 1, float64); uniform if the product is all zero."""
    w = router_w.double() * torch.as_tensor(q_part, dtype=torch.float64)
    total = w.sum()
    if not bool(total > 0):
        return torch.full_like(w, 1.0 / w.numel())
    return w / total


def weight_entropy(w: torch.Tensor) -> float:
    """Shannon entropy (nats) of a weight vector; log(K) is uniform, 0 is one client takes all."""
    w = w.detach().double()
    return float(-(w * torch.log(w.clamp_min(1e-300))).sum())


def _present(protos: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(protos).all(-1) & (protos.norm(dim=-1) > 0)


def prototype_coherence(img_protos: torch.Tensor, txt_protos: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean cosine between each client's image and text prototype, over clients that have both.

    `mask` (K, 2) says who has which modality; without it a row counts as present when it is finite
    and non-zero. NaN when no client has both.
    """
    has_both = _present(img_protos) & _present(txt_protos)
    if mask is not None:
        has_both &= mask[:, IMAGE].bool() & mask[:, TEXT].bool()
    if not bool(has_both.any()):
        return float("nan")
    return float(F.cosine_similarity(img_protos[has_both].double(), txt_protos[has_both].double(), dim=-1).mean())


# ---------------------------------------------------------------------------------------------
# Global prototypes


@dataclass
class ReportedRows:
    """One modality's prototype sums of a round (`GlobalPrototypes.gather`), float64: only the
    (client, cluster) rows with samples, in the round's client order and then cluster order, so that
    sums over clients run in client order as a loop over them would; plus every client's counts per
    cluster (zeros where it lacks the modality). In "global" granularity already folded to one cluster."""

    client: torch.Tensor  # (n,) the row's client, its place in the round
    cluster: torch.Tensor  # (n,)
    sums: torch.Tensor  # (n, dim)
    counts: torch.Tensor  # (n,) all > 0
    cluster_counts: torch.Tensor  # (K, C)


@dataclass
class RoundPrototypes:
    """A round's client prototypes per modality ("image", "text"), converted once for every step
    that reads them (`pool_clients`, `update`)."""

    sums: dict[str, ReportedRows]

    def __len__(self) -> int:
        return len(self.sums["image"].cluster_counts)


class GlobalPrototypes:
    """EMA global prototypes per semantic cluster and modality, plus the global alignment direction.

    granularity "cluster": one prototype per cluster; "global": one for all clusters (the authors'
    code), stored as C=1. Clients always send per-cluster sums; in "global" mode they are folded here.
    """

    def __init__(self, num_clusters: int, dim: int, decay: float = 0.95, granularity: str = "cluster"):
        if granularity not in ("cluster", "global"):
            raise ValueError(f"granularity must be 'cluster' or 'global', got {granularity!r}")
        self.num_clusters = num_clusters
        self.dim = dim
        self.decay = decay
        self.granularity = granularity
        c = num_clusters if granularity == "cluster" else 1
        self.image = torch.zeros(c, dim)
        self.text = torch.zeros(c, dim)
        self.seen = torch.zeros(c, 2, dtype=torch.bool)
        self.align = torch.zeros(dim)
        self.align_seen = False

    @staticmethod
    def collapse(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold per-cluster sums (C, dim) and counts (C,) into one cluster: (1, dim), (1,)."""
        return sums.sum(0, keepdim=True), counts.reshape(-1).sum(0, keepdim=True)

    def _client_sums(self, proto: dict, modality: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A client's sums (C, dim) and counts (C,) as sent, folded in float64 in "global"
        granularity; None where it lacks the modality."""
        sums, counts = proto.get(f"{modality}_sum"), proto.get(f"{modality}_count")
        if sums is None or counts is None:
            return None
        sums, counts = torch.as_tensor(sums).reshape(-1, self.dim), torch.as_tensor(counts).reshape(-1)
        if self.granularity == "global":
            sums, counts = self.collapse(sums.double(), counts.double())
        if len(sums) != len(self.image):
            raise ValueError(f"{modality} sums have {len(sums)} clusters, expected {len(self.image)}")
        return sums, counts

    def _rows(self, client_protos: list[dict], modality: str) -> ReportedRows:
        sent = [(i, got) for i, proto in enumerate(client_protos)
                if (got := self._client_sums(proto, modality)) is not None]
        cluster_counts = torch.zeros(len(client_protos), len(self.image), dtype=torch.float64)
        if not sent:
            empty = torch.zeros(0, dtype=torch.long)
            return ReportedRows(empty, empty, torch.zeros(0, self.dim, dtype=torch.float64),
                                torch.zeros(0, dtype=torch.float64), cluster_counts)
        clients = torch.tensor([i for i, _ in sent])
        counts = torch.stack([c.double() for _, (_, c) in sent])
        cluster_counts[clients] = counts
        has = counts > 0
        at = has.nonzero()  # row-major: by client, then by cluster, as the selections below
        # Only the rows with samples are converted (float32 to float64 is exact).
        sums = torch.stack([s for _, (s, _) in sent])[has].double()
        return ReportedRows(clients[at[:, 0]], at[:, 1], sums, counts[has], cluster_counts)

    def gather(self, client_protos: "list[dict] | RoundPrototypes") -> "RoundPrototypes":
        """The round's client prototypes as `RoundPrototypes`: what `pool_clients` and `update` read."""
        if isinstance(client_protos, RoundPrototypes):
            return client_protos
        return RoundPrototypes({name: self._rows(client_protos, name) for name in ("image", "text")})

    def _fused(self, reported: "RoundPrototypes", weights: torch.Tensor, modality: str):
        """The w-weighted mean of client prototypes per cluster, weights renormalised over the clients
        that have samples in that cluster. Returns (values (C, dim) float64, contributed (C,) bool).
        Each cluster's sums run over its clients in the round's order (index_add_ adds its rows in
        order on the CPU), as a loop over the clients would."""
        c = len(self.image)
        rows = reported.sums[modality]
        mean = rows.sums / rows.counts.clamp_min(1)[:, None]
        w = weights[rows.client]
        num = torch.zeros(c, self.dim, dtype=torch.float64).index_add_(0, rows.cluster, w[:, None] * mean)
        wsum = torch.zeros(c, dtype=torch.float64).index_add_(0, rows.cluster, w)
        contributors = torch.bincount(rows.cluster, minlength=c).double()
        uniform_num = torch.zeros(c, self.dim, dtype=torch.float64).index_add_(0, rows.cluster, mean)
        contributed = contributors > 0
        # If every contributor to a cluster has weight 0, fall back to their plain mean rather than 0/0.
        values = torch.where((wsum > 0)[:, None], num / wsum.clamp_min(1e-300)[:, None],
                             uniform_num / contributors.clamp_min(1)[:, None])
        return values, contributed

    def update(self, client_protos: "list[dict] | RoundPrototypes", weights: torch.Tensor) -> None:
        """EMA step with the round's w-weighted client prototypes.

        Each dict holds 'image_sum' (C, dim), 'image_count' (C,), 'text_sum', 'text_count' (or the
        dicts come `gather`ed); a missing (or None) modality and clusters with count 0 do not
        contribute. A cluster/modality seen for the first time takes the new value directly; later
        g <- decay*g + (1-decay)*new.
        """
        reported = self.gather(client_protos)
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if len(weights) != len(reported):
            raise ValueError(f"{len(reported)} clients but {len(weights)} weights")
        fresh = {}
        for col, (name, store) in enumerate((("image", self.image), ("text", self.text))):
            values, contributed = self._fused(reported, weights, name)
            first = contributed & ~self.seen[:, col]
            later = contributed & self.seen[:, col]
            store[first] = values[first].to(store.dtype)
            store[later] = (self.decay * store[later].double() + (1 - self.decay) * values[later]).to(store.dtype)
            self.seen[:, col] |= contributed
            fresh[name] = (values, contributed)
        # Alignment direction from this round's fused prototypes, over the clusters where both
        # modalities were sent, so it measures the modality gap and not a difference in semantic mix.
        both = fresh["image"][1] & fresh["text"][1]
        if bool(both.any()):
            gap = fresh["image"][0][both].mean(0) - fresh["text"][0][both].mean(0)
            direction = F.normalize(gap, dim=0, eps=1e-12).to(self.align.dtype)
            if self.align_seen:
                self.align = self.decay * self.align + (1 - self.decay) * direction
            else:
                self.align, self.align_seen = direction, True

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """g_I, g_T: the global prototypes averaged over seen clusters (zeros if none seen yet)."""
        out = []
        for col, store in ((IMAGE, self.image), (TEXT, self.text)):
            seen = self.seen[:, col]
            out.append(store[seen].mean(0) if bool(seen.any()) else torch.zeros(self.dim))
        return out[0], out[1]

    def global_align(self) -> torch.Tensor | None:
        """The global alignment direction, or None before any round sent both modalities."""
        return self.align.clone() if self.align_seen else None

    def pool_clients(self, client_protos: "list[dict] | RoundPrototypes") \
            -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router inputs: each client's prototype pooled over its clusters (its mean embedding) per
        modality, (K, dim) each, and which modalities it actually has, (K, 2) bool.

        A missing modality is filled with the global prototypes of the clusters the client's other
        modality covers, weighted by its counts (METHOD.md fills with the global prototype; per
        cluster keeps the client's alignment direction a measure of the modality gap). Falls back to
        the pooled global prototype, then to zeros.
        """
        reported = self.gather(client_protos)
        k = len(reported)
        pooled = self.pooled()
        protos, has = [], torch.zeros(k, 2, dtype=torch.bool)
        for col, name in ((IMAGE, "image"), (TEXT, "text")):
            rows = reported.sums[name]
            totals = rows.cluster_counts.sum(1)
            has[:, col] = totals > 0
            sums = torch.zeros(k, self.dim, dtype=torch.float64).index_add_(0, rows.client, rows.sums)
            protos.append((sums / totals.clamp_min(1e-300)[:, None]).float())
        for col, other, store in ((IMAGE, "text", self.image), (TEXT, "image", self.text)):
            missing = (~has[:, col]).nonzero().flatten()
            if not len(missing):
                continue
            # The other modality's counts over the clusters this one has a global prototype for.
            c = reported.sums[other].cluster_counts[missing] * self.seen[:, col]
            total = c.sum(1)
            filled = ((c[:, :, None] * store.double()).sum(1) / total.clamp_min(1e-300)[:, None]).float()
            protos[col][missing] = torch.where((total > 0)[:, None], filled, pooled[col])
        return protos[IMAGE], protos[TEXT], has

    def client_view(self) -> dict[str, torch.Tensor]:
        """What a client needs: image, text (num_clusters, dim) and seen (num_clusters, 2), copies.

        In "global" granularity the single prototype is repeated for every cluster, so client code
        indexes by cluster id the same way in both modes.
        """
        reps = self.num_clusters if self.granularity == "global" else 1
        return {"image": self.image.repeat(reps, 1), "text": self.text.repeat(reps, 1),
                "seen": self.seen.repeat(reps, 1)}

    def state_dict(self) -> dict:
        return {"image": self.image.clone(), "text": self.text.clone(), "seen": self.seen.clone(),
                "align": self.align.clone(), "align_seen": self.align_seen, "decay": self.decay,
                "granularity": self.granularity, "num_clusters": self.num_clusters, "dim": self.dim}

    def load_state_dict(self, state: dict) -> None:
        for key in ("granularity", "num_clusters", "dim"):
            if state[key] != getattr(self, key):
                raise ValueError(f"checkpoint has {key}={state[key]!r}, this run has {getattr(self, key)!r}")
        self.image = state["image"].clone()
        self.text = state["text"].clone()
        self.seen = state["seen"].clone().bool()
        self.align = state["align"].clone()
        self.align_seen = bool(state["align_seen"])
        self.decay = float(state["decay"])


# ---------------------------------------------------------------------------------------------
# Router training


def client_alignment(img_protos: torch.Tensor, txt_protos: torch.Tensor) -> torch.Tensor:
    """a_k = normalize(img_k - txt_k), the client alignment directions (K, dim)."""
    return F.normalize(img_protos - txt_protos, dim=-1, eps=1e-12)


def _one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)


def router_loss(router_w: torch.Tensor, img_protos: torch.Tensor, txt_protos: torch.Tensor, g_img: torch.Tensor,
                g_txt: torch.Tensor, client_align: torch.Tensor, global_align: torch.Tensor | None,
                b1: float = 1.0, b2: float = 1.0, b4: float = 0.1, b5: float = 0.3) -> tuple[torch.Tensor, dict]:
    """METHOD.md's retrieval-consistency loss for the router weights w (K,):

    b1*(1-cos(g^_I, g_I)) + b2*(1-cos(g^_T, g_T)) - b4*H(w)
      + b5*(0.5*(1-cos(a^, a)) + 0.5*sum_k w_k*(1-cos(a_k, a^)))

    g^ = normalize(sum_k w_k proto_k), a^ = normalize(sum_k w_k a_k), a = global_align. The targets
    (g_img, g_txt, global_align) are detached. With global_align None (no direction yet) the
    (1-cos(a^, a)) half is left out. Returns (loss, parts as floats).
    """
    w = router_w
    dt = w.dtype
    img, txt, a_k = img_protos.to(dt), txt_protos.to(dt), client_align.to(dt)
    g_hat_img = F.normalize(w @ img, dim=0, eps=1e-12)
    g_hat_txt = F.normalize(w @ txt, dim=0, eps=1e-12)
    image_term = _one_minus_cos(g_hat_img, g_img.detach().to(dt))
    text_term = _one_minus_cos(g_hat_txt, g_txt.detach().to(dt))
    entropy = -(w * torch.log(w.clamp_min(1e-30))).sum()
    a_hat = F.normalize(w @ a_k, dim=0, eps=1e-12)
    spread = (w * _one_minus_cos(a_k, a_hat.unsqueeze(0))).sum()
    to_global = _one_minus_cos(a_hat, global_align.detach().to(dt)) if global_align is not None else w.new_zeros(())
    align_term = 0.5 * to_global + 0.5 * spread
    loss = b1 * image_term + b2 * text_term - b4 * entropy + b5 * align_term
    parts = {name: float(value.detach()) for name, value in (
        ("loss", loss), ("image_consistency", image_term), ("text_consistency", text_term), ("entropy", entropy),
        ("alignment", align_term))}
    return loss, parts


class RouterTrainer:
    """The server's router and its Adam optimiser: weights for aggregation, one training step a round."""

    def __init__(self, dim: int, hidden: int = 128, heads: int = 4, blocks: int = 2, seed: int = 0,
                 lr: float = 1e-3, b1: float = 1.0, b2: float = 1.0, b4: float = 0.1, b5: float = 0.3):
        self.router = SemanticRouter(dim, hidden, heads, blocks, seed)
        self.optimizer = ForeachAdam(self.router.parameters(), lr)
        self.coefficients = {"b1": b1, "b2": b2, "b4": b4, "b5": b5}

    @torch.no_grad()
    def weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """Routing weights (K,) without an autograd graph (the server weighs a round with `route`)."""
        return self.router(tokens).detach()

    def route(self, tokens: torch.Tensor) -> torch.Tensor:
        """Routing weights (K,) with their autograd graph: detached, they weigh the round's
        aggregation; passed to `step` as `routed`, the step needs no second forward pass."""
        return self.router(tokens)

    def step(self, tokens: torch.Tensor, img_protos: torch.Tensor, txt_protos: torch.Tensor, g_img: torch.Tensor,
             g_txt: torch.Tensor, client_align: torch.Tensor, global_align: torch.Tensor | None,
             routed: torch.Tensor | None = None) -> dict:
        """One Adam step on router_loss; returns the loss parts before the step (floats). `routed`:
        `route(tokens)` since the last step, if the caller has it.

        With one client the softmax is constant (w = 1) and there is nothing to learn, so no step is
        taken (an Adam step on a zero gradient would still move the weights by momentum).
        """
        w = self.router(tokens) if routed is None else routed
        loss, parts = router_loss(w, img_protos, txt_protos, g_img, g_txt, client_align, global_align,
                                  **self.coefficients)
        if len(w) > 1 and math.isfinite(parts["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return parts

    def state_dict(self) -> dict:
        # Deep copies: Adam's state_dict holds its live moment tensors, and a trainer loaded from it
        # would otherwise share (and keep mutating) them.
        return copy.deepcopy({"router": self.router.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load_state_dict(self, state: dict) -> None:
        self.router.load_state_dict(state["router"])
        self.optimizer.load_state_dict(state["optimizer"])

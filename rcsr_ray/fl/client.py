"""The client update: a plain function of (global state, client data, settings, seed).

Both backends call `ClientWorker.update`; each worker keeps one adapter model and swaps weights in
place per client, so nothing is rebuilt per client or per round. A worker trains on one torch
device (a Ray actor's GPU share, or the CPU); whatever leaves it, and whatever it keeps as client
state (checkpointed), is on the CPU, so the server and checkpoints never see the device.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from rcsr_ray.config import Config
from rcsr_ray.data.federation import ClientShard
from rcsr_ray.data.partition import PAIRED
from rcsr_ray.eval.retrieval import evaluate
from rcsr_ray.models.adapters import AdapterPair, adapter_model, apply_adapters, flat_views, initial_params


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` inside the block, and back after."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


# An update's cost apart from its size, in adapter passes of one image (`ClientSettings.update_cost`).
UPDATE_PASSES = 70


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
    anchor_weight: float = 0.0  # prototype anchoring (RCSR); 0 = off
    anchor_mode: str = "instance"  # instance | centroid (see anchor_loss)
    clip_anchor: float = 0.0  # keep adapted embeddings near the frozen ones (RCSR's optional CLIP anchor)
    personal: bool = False  # train client-owned personal adapters (FedPer, RCSR option); never sent
    moon_mu: float = 0.0  # MOON's model-contrastive term; 0 = off
    moon_temperature: float = 0.5
    report_prototypes: bool = False  # send per-cluster prototypes and update geometry (RCSR)
    num_clusters: int = 1  # prototype slots: the partition's clusters (the server folds them for "global")

    @property
    def keeps_client_state(self) -> bool:
        """Whether an update reads or writes state the client keeps between rounds; if not, any
        worker can run it, which lets a backend balance a round's work over its workers."""
        return self.mode == "local" or self.personal or self.moon_mu > 0

    def update_cost(self, modality: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Clients' relative cost of an update, for balancing work over workers: adapter passes per
        image, two for a paired client and one for a unimodal client, which trains only when anchoring
        to prototypes (one pass per image measured at half a paired client's time per image), plus
        what every update costs whatever its size (fresh weights and optimizer, RCSR's prototypes):
        about UPDATE_PASSES passes (fitted on S4's clients, cost against CPU time: 2.6 ms a client)."""
        modality, images = np.asarray(modality), np.asarray(images, np.int64)
        passes = np.where(modality == PAIRED, 2 * images, images if self.anchor_weight > 0 else 0)
        return passes + UPDATE_PASSES

    @classmethod
    def from_config(cls, cfg: Config, mode: str = "global", **extra) -> "ClientSettings":
        t = cfg.train
        return cls(t.local_epochs, t.batch_size, t.lr, t.weight_decay, t.temperature, mode=mode, **extra)


class _PicklesTensorsAsArrays:
    """Pickled with its tensors as numpy arrays: torch pickles a tensor's storage through
    `torch.save`, which made collecting a round's updates from Ray actors cost 5-10x more than the
    same bytes as arrays (which Ray moves out-of-band). Tensors arrive on the CPU as writable copies
    (Ray hands out read-only views of its object store); these classes hold no numpy arrays."""

    def __getstate__(self):
        return _map_leaves(self.__dict__, lambda x: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)

    def __setstate__(self, state):
        self.__dict__.update(_map_leaves(
            state, lambda x: torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x))


@dataclass
class GlobalState(_PicklesTensorsAsArrays):
    """What the server broadcasts each round."""

    params: torch.Tensor
    prototypes: dict[str, torch.Tensor] | None = None  # image (C,d), text (C,d), seen (C,2) bool


@dataclass
class ClientUpdate(_PicklesTensorsAsArrays):
    client_id: int
    modality: int
    num_samples: int
    delta: torch.Tensor | None  # None: the client had nothing it could train on
    loss: float = float("nan")
    steps: int = 0
    params: torch.Tensor | None = None  # only in "local" mode
    prototypes: dict[str, torch.Tensor] | None = None  # image_sum, image_count, text_sum, text_count
    geometry: torch.Tensor | None = None  # update norm, image share of it, norm/sqrt(n) (RCSR)


@dataclass(frozen=True)
class RowLayout:
    """Where an update's tensors sit in one flat float32 row of a backend's shared memory: the delta
    (`params` entries), then, when the settings report prototypes, each modality's per-slot sums
    and counts. Through such a row an actor hands back RCSR's prototypes (about 200 KB a client
    with 50 clusters) without the object store, as it does the delta."""

    params: int
    slots: int = 0  # prototype slots; 0: no prototypes
    dim: int = 0

    @classmethod
    def of(cls, params: int, settings: ClientSettings, dim: int) -> "RowLayout":
        return cls(params, settings.num_clusters, dim) if settings.report_prototypes else cls(params)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The prototype tensors, in row order (as `ClientWorker._prototypes` names them)."""
        if not self.slots:
            return {}
        s, d = self.slots, self.dim
        return {"image_sum": (s, d), "image_count": (s,), "text_sum": (s, d), "text_count": (s,)}

    @property
    def width(self) -> int:
        return self.params + sum(math.prod(shape) for shape in self.shapes.values())

    def prototypes(self, tail: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of the prototype part of a row (`tail`: the row after the delta), by name."""
        views, offset = {}, 0
        for name, shape in self.shapes.items():
            views[name] = tail[offset:offset + math.prod(shape)].view(shape)
            offset += math.prod(shape)
        return views


def client_seed(seed: int, round_idx: int, client: int) -> int:
    """Each client's randomness depends only on (seed, round, client id), never on scheduling."""
    return int(np.random.SeedSequence([seed, round_idx, client]).generate_state(1, np.uint64)[0] >> 1)


def info_nce(img: torch.Tensor, txt: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = img @ txt.T / temperature
    labels = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class ClientWorker:
    """Holds one adapter model and the shards of the clients it serves, plus their private state."""

    def __init__(self, federation, bottleneck: int, torch_threads: int = 1, device: str | torch.device = "cpu"):
        self.federation = federation  # anything with .shard(client) -> ClientShard
        self.device = torch.device(device)
        self.bottleneck = bottleneck
        self.model = adapter_model(federation.store, bottleneck, device=self.device)
        self.torch_threads = torch_threads
        self.shards: dict[int, ClientShard] = {}
        self.inputs: dict[int, tuple] = {}  # per client: (shard, its tensors on the device)
        self.state: dict[int, dict] = {}  # per client, never sent to the server; CPU tensors
        self.test_shards: dict[int, ClientShard] = {}
        # CPU seconds this worker's thread spent in client updates: set against a round's time, it
        # tells how much slower the same updates run on busy cores (benchmarks/round_overhead.py).
        self.update_cpu_s = 0.0
        self.shard_reads = 0  # shards read from the feature store (again after `forget`)

    # Scratch models whose weights are swapped in per client, built on first use (only the methods
    # that need them do): personal adapters (on top of the shared ones' output), MOON's references.
    @cached_property
    def personal_model(self) -> AdapterPair:
        return AdapterPair(self.model.dim, self.bottleneck, device=self.device)

    @cached_property
    def moon_models(self) -> tuple:
        return tuple(adapter_model(self.federation.store, self.bottleneck, device=self.device) for _ in range(2))

    def shard(self, client: int) -> ClientShard:
        """The client's data, read from the feature store on first use and then kept."""
        if client not in self.shards:
            self.shards[client] = self.federation.shard(client)
            self.state[client] = {}
            self.shard_reads += 1
        return self.shards[client]

    def forget(self, client: int) -> None:
        """Drop a client's data and (empty) state: a client this worker ran only as a guest."""
        for held in (self.shards, self.inputs, self.state):
            held.pop(client, None)

    def _tensors(self, shard: ClientShard) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A shard's images, captions and cluster slots as tensors on the device; moved there once for
        the shards this worker keeps."""
        cached = self.inputs.get(shard.client_id)
        if cached is None or cached[0] is not shard:
            cached = (shard, tuple(torch.from_numpy(np.asarray(a)).to(self.device) for a in (
                shard.image_emb, shard.caption_emb, np.asarray(shard.clusters, np.int64))))
            if self.shards.get(shard.client_id) is shard:
                self.inputs[shard.client_id] = cached
        return cached[1]

    def update(self, client: int, state: GlobalState, settings: ClientSettings, seed: int,
               round_idx: int, out: torch.Tensor | None = None) -> ClientUpdate:
        """The client's update. `out`, a CPU float32 row laid out by `RowLayout.of(params, settings,
        dim)` (a row of a backend's shared memory), receives the delta and any prototypes, which are
        then the update's own (views of `out`); a row of another size is left alone."""
        started = time.thread_time()
        try:
            layout = RowLayout.of(state.params.numel(), settings, self.model.dim) if out is not None else None
            if layout is None or out.dtype != torch.float32 or out.device.type != "cpu" or out.shape != (layout.width,):
                return self._update(client, state, settings, seed, round_idx, None)
            update = self._update(client, state, settings, seed, round_idx, out[:layout.params])
            if update.prototypes:
                views = layout.prototypes(out[layout.params:])
                update.prototypes = {k: views[k].copy_(v) for k, v in update.prototypes.items()}
            return update
        finally:
            self.update_cpu_s += time.thread_time() - started

    def _update(self, client: int, state: GlobalState, settings: ClientSettings, seed: int,
                round_idx: int, out: torch.Tensor | None) -> ClientUpdate:
        shard = self.shard(client)
        own = self.state[client]
        has_img, has_txt = shard.has_image, shard.has_text
        slots = self._tensors(shard)[2]
        anchors = anchor_targets(_to(state.prototypes, self.device)) if settings.anchor_weight > 0 else None
        trainable = shard.num_images >= 2 and (shard.modality == PAIRED or (
            anchors is not None and bool(anchors["seen"][slots, 1 if has_img else 0].any())))
        if not trainable:
            # No contrastive pair and no prototype to anchor to: the client sits this round out.
            update = ClientUpdate(client, shard.modality, shard.num_images, None)
            if settings.report_prototypes:
                self.model.load_flat(state.params)
                update.prototypes = self._prototypes(shard, slots, settings.num_clusters,
                                                     self._embedded(shard, has_img, has_txt))
            return update
        start = own.get("params", state.params) if settings.mode == "local" else state.params
        with torch_threads(self.torch_threads):
            g = torch.Generator().manual_seed(client_seed(seed, round_idx, client))
            loss, steps = self._train(start, state.params, shard, slots, anchors, settings, g, own)
            trained = self.model.flat.detach()
            # A copy only where the trained weights outlive the model's next client (local mode) or
            # live on another device; else the delta is read straight from the model's buffer.
            new = trained.to("cpu", copy=True) if settings.mode == "local" or trained.device.type != "cpu" \
                else trained
            delta = torch.sub(new, start, out=out) if out is not None else new - start
            update = ClientUpdate(client, shard.modality, shard.num_images, delta, loss, steps)
            personal = settings.personal and shard.modality == PAIRED  # unpaired: no contrastive signal
            if personal or settings.report_prototypes:
                # One pass of the shard through the trained shared adapters serves both.
                embedded = self._embedded(shard, has_img, has_txt)
                if personal:
                    self._train_personal(shard, settings, g, own, embedded)
                if settings.report_prototypes:
                    update.prototypes = self._prototypes(shard, slots, settings.num_clusters, embedded)
                    update.geometry = self._geometry(update.delta, shard.num_images)
        if settings.mode == "local":
            own["params"] = update.params = new
        return update

    def _train(self, start, global_params, shard: ClientShard, slots, anchors, s: ClientSettings,
               g: torch.Generator, own: dict) -> tuple[float, int]:
        """The shared adapters' local training, batches drawn from `g`, from `start` (on the model)."""
        model = self.model
        model.load_flat(start)
        params = list(model.parameters())
        prox_target = global_params.to(self.device) if s.prox_mu > 0 else None
        moon = self._moon_references(global_params, own.get("moon_prev", global_params)) if s.moon_mu > 0 else None
        opt = model.optimizer(s.lr, s.weight_decay)
        # Batches are drawn on the CPU whatever the device, so every device sees the same batches.
        has_img, has_txt = shard.has_image, shard.has_text
        images, captions, _ = self._tensors(shard)
        slots = slots.to(self.device)
        total, steps = 0.0, 0
        for idx, pick in _batches(shard, s, g):
            idx, pick = idx.to(self.device), pick.to(self.device)
            img, txt = model.encode(images[idx] if has_img else None, captions[pick] if has_txt else None)
            loss = info_nce(img, txt, s.temperature) if has_img and has_txt else img.new_zeros(()) \
                if has_img else txt.new_zeros(())
            if anchors is not None:
                loss = loss + s.anchor_weight * anchor_loss(img, txt, slots[idx], anchors, s.anchor_mode)
            if s.clip_anchor > 0:
                loss = loss + s.clip_anchor * clip_anchor_loss(img, images[idx], txt, captions[pick])
            if prox_target is not None:
                prox, prox_grad = proximal_term(model.flat, prox_target, s.prox_mu, params)
                loss = loss + prox
            if moon is not None:
                loss = loss + s.moon_mu * moon_loss(img, txt, images[idx], captions[pick], *moon, s.moon_temperature)
            if not loss.requires_grad and prox_target is None:
                continue  # nothing to anchor to in this batch
            model.zero_grad()
            if loss.requires_grad:
                loss.backward()
            if prox_target is not None:
                model.flat.grad.add_(prox_grad)
            opt.step()
            total += loss.item()
            steps += 1
        if s.moon_mu > 0:
            own["moon_prev"] = model.flat.detach().to("cpu", copy=True)
        return total / max(steps, 1), steps

    def _moon_references(self, global_params: torch.Tensor, previous: torch.Tensor) -> tuple[AdapterPair, AdapterPair]:
        """The global and the client's previous local adapters, frozen, for MOON's model-contrastive term."""
        glob, prev = self.moon_models
        glob.load_flat(global_params)
        prev.load_flat(previous)
        return glob, prev

    def _train_personal(self, shard: ClientShard, s: ClientSettings, g: torch.Generator, own: dict,
                        embedded: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Train a paired client's personal adapters on its pairs as the shared adapters embed them
        (`embedded`); they stay here. Batches continue `g`'s stream after the shared training."""
        images, captions = embedded
        personal = self.personal_model
        personal.load_flat(own["personal"] if "personal" in own else self._personal_init(shard.client_id))
        opt = personal.optimizer(s.lr, s.weight_decay)
        if "personal_opt" in own:
            opt.load_state_dict(own["personal_opt"])  # moves the saved state to the parameters' device
        for idx, pick in _batches(shard, s, g):
            idx, pick = idx.to(self.device), pick.to(self.device)
            loss = info_nce(personal.image(images[idx]), personal.text(captions[pick]), s.temperature)
            personal.zero_grad()
            loss.backward()
            opt.step()
        own["personal"] = personal.flat.detach().to("cpu", copy=True)
        own["personal_opt"] = _to(opt.state_dict(), "cpu")

    def _personal_init(self, client: int) -> torch.Tensor:
        hidden = self.personal_model.image.down.out_features
        return initial_params(self.personal_model.dim, hidden, 0.0, seed=client)

    @torch.no_grad()
    def _embedded(self, shard: ClientShard, image: bool, text: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A shard's images and captions (those asked for, else None) through the shared adapters as
        loaded (on the device)."""
        images, captions, _ = self._tensors(shard)
        chunk = self.model.eval_chunk
        return (_chunked(self.model.image, images, chunk) if image else None,
                _chunked(self.model.text, captions, chunk) if text else None)

    def evaluate_local(self, client: int, global_params: torch.Tensor) -> dict:
        """R@1 on the client's personal test set, with the global adapters and, if it has them, its
        personal ones. Only these numbers leave the client."""
        if client not in self.test_shards:
            self.test_shards[client] = self.federation.local_test_shard(client)
        shard = self.test_shards[client]
        personal = self.state.get(client, {}).get("personal")
        return local_retrieval(self.model, global_params, shard,
                               (self.personal_model, personal) if personal is not None else None)

    def _prototypes(self, shard: ClientShard, slots, num_slots: int, embedded) -> dict:
        """Per-cluster sums and counts (CPU) of the adapted embeddings (`_embedded`) of each modality
        the client has."""
        img, txt = embedded
        slots = slots.to(self.device)
        d = self.model.dim
        out = {}
        if img is not None:
            out["image_sum"] = img.new_zeros(num_slots, d).index_add_(0, slots, img)
            out["image_count"] = torch.bincount(slots, minlength=num_slots).float()
        if txt is not None:
            counts = torch.from_numpy(np.diff(shard.caption_offsets)).to(self.device)
            cap_slots = torch.repeat_interleave(slots, counts)
            out["text_sum"] = txt.new_zeros(num_slots, d).index_add_(0, cap_slots, txt)
            out["text_count"] = torch.bincount(cap_slots, minlength=num_slots).float()
        return _to(out, "cpu")

    def _geometry(self, delta: torch.Tensor, n: int) -> torch.Tensor:
        """Update norm, the image adapter's share of it, norm / sqrt(samples). The server adds the
        cosine to the client's previous update, which it saw, so clients keep no state for it."""
        norm = delta.norm()
        img_norm, txt_norm = delta[:self.model.image_numel].norm(), delta[self.model.image_numel:].norm()
        # The image share of the update norm stays bounded for unimodal clients, unlike a ratio.
        return torch.stack([norm, img_norm / (img_norm + txt_norm + 1e-12), norm / n ** 0.5]).float()


def _chunked(fn, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """fn over x, `chunk` rows at a time (None: all at once)."""
    if chunk is None or len(x) <= chunk:
        return fn(x)
    return torch.cat([fn(x[i:i + chunk]) for i in range(0, len(x), chunk)])


def _map_leaves(obj, fn):
    """`obj` with `fn` applied to everything inside its dicts, lists and tuples."""
    if isinstance(obj, dict):
        return {k: _map_leaves(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_leaves(v, fn) for v in obj)
    return fn(obj)


def _to(obj, device):
    """`obj` (tensors inside dicts, lists, tuples) with every tensor on `device`; no copy where already there."""
    return _map_leaves(obj, lambda x: x.to(device) if isinstance(x, torch.Tensor) else x)


def _batches(shard: ClientShard, s: ClientSettings, g: torch.Generator):
    """Local epochs of shuffled image batches, one random caption per image: (image idx, caption rows)."""
    offsets = torch.from_numpy(shard.caption_offsets)
    counts = offsets[1:] - offsets[:-1]
    n = shard.num_images
    for _ in range(s.local_epochs):
        perm = torch.randperm(n, generator=g)
        for b in range(0, n, s.batch_size):
            idx = perm[b:b + s.batch_size]
            if len(idx) < 2:
                continue
            yield idx, offsets[idx] + (torch.rand(len(idx), generator=g) * counts[idx]).long()


@torch.no_grad()
def proximal_term(flat: torch.Tensor, target: torch.Tensor, mu: float,
                  like: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """FedProx's term 0.5*mu*||w - w_global||^2 over the flat weights, and its gradient, without autograd.

    Autograd through this term took a tenth of an RCSR client update on the CPU (dozens of small
    operations a step, a set per parameter tensor); here it is a handful over the flat buffer. The
    bits are autograd's for `0.5 * mu * sum((p - a).pow(2).sum() for each parameter p)` (`like`: the
    parameters, whose views of `flat` are summed one by one, in order): the value is computed the
    same way; pow's backward gives 2 * (w - w_global) times 0.5*mu as a float32, which is
    (w - w_global) times mu as a float32 (halving and doubling are exact). Added to the other
    gradients after their backward, the gradient gives the sum autograd would have made."""
    diff = flat - target
    value = 0.5 * mu * sum(v.sum() for v in flat_views(diff.pow(2), like))
    return value, diff.mul_(mu)


def moon_loss(img, txt, img_in, txt_in, glob: AdapterPair, prev: AdapterPair, temperature: float) -> torch.Tensor:
    """MOON: pull each adapted embedding toward the global model's and away from the previous local one's."""
    terms = []
    for z, x, side in ((img, img_in, "image"), (txt, txt_in, "text")):
        if z is None:
            continue
        with torch.no_grad():
            zg, zp = getattr(glob, side)(x), getattr(prev, side)(x)
        logits = torch.stack([(z * zg).sum(-1), (z * zp).sum(-1)], dim=1) / temperature
        terms.append(F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long, device=z.device)))
    return torch.stack(terms).mean()


@torch.no_grad()
def local_retrieval(model: AdapterPair, params: torch.Tensor, shard: ClientShard,
                    personal: tuple[AdapterPair, torch.Tensor] | None = None) -> dict:
    """Retrieval R@1 on one client's test shard under the shared adapters (and personal ones on top)."""
    caption_image = np.repeat(np.arange(shard.num_images), np.diff(shard.caption_offsets))
    img, txt = apply_adapters(model, params, torch.from_numpy(shard.image_emb), torch.from_numpy(shard.caption_emb))
    m = evaluate(img, txt, caption_image)
    out = {"global_i2t_r1": m["i2t_r1"], "global_t2i_r1": m["t2i_r1"]}
    if personal is not None:
        m = evaluate(*apply_adapters(personal[0], personal[1], img, txt), caption_image)
        out["personal_i2t_r1"], out["personal_t2i_r1"] = m["i2t_r1"], m["t2i_r1"]
    return out


def anchor_targets(protos: dict | None) -> dict | None:
    """The global prototypes with each modality's also normalised ("image_unit", "text_unit"), for
    `anchor_loss` to pick rows from: the same bits as normalising the picked rows (row by row)."""
    if protos is None:
        return None
    return {**protos, **{f"{name}_unit": F.normalize(protos[name], dim=-1) for name in ("image", "text")}}


def anchor_loss(img: torch.Tensor | None, txt: torch.Tensor | None, slots: torch.Tensor, protos: dict,
                mode: str = "instance") -> torch.Tensor:
    """(1 - cos) to the other modality's global prototype of the same cluster.

    mode "instance": every adapted embedding is pulled (METHOD.md as written; collapses instances
    toward the cluster mean). "centroid": the batch's per-cluster mean embedding is pulled, which
    moves clusters into place without squeezing the instances inside them. `protos` as
    `anchor_targets` makes them saves normalising the picked prototypes at every step.
    """
    terms = []
    for emb, target, col in ((img, "text", 1), (txt, "image", 0)):
        if emb is None:
            continue
        seen = protos["seen"][slots, col]
        where = slots
        if not bool(seen.all()):  # all seen, as soon as every cluster has both prototypes: no copies
            if not seen.any():
                continue
            emb, where = emb[seen], slots[seen]
        if mode == "centroid":
            where, inverse, counts = torch.unique(where, return_inverse=True, return_counts=True)
            means = emb.new_zeros(len(where), emb.shape[1]).index_add(0, inverse, emb)
            cos = F.cosine_similarity(means, protos[target][where], dim=-1)
            terms.append(((1 - cos) * counts).sum() / counts.sum())
        else:
            unit = protos.get(f"{target}_unit")
            goal = unit[where] if unit is not None else F.normalize(protos[target][where], dim=-1)
            terms.append((1 - (emb * goal).sum(-1)).mean())
    return torch.stack(terms).mean() if terms else protos["seen"].new_zeros((), dtype=torch.float32)


def clip_anchor_loss(img, img_in, txt, txt_in) -> torch.Tensor:
    """Mean (1 - cos) between adapted and frozen embeddings: stops anchoring from collapsing instances."""
    terms = [(1 - F.cosine_similarity(a, x, dim=-1)).mean() for a, x in ((img, img_in), (txt, txt_in)) if a is not None]
    return torch.stack(terms).mean()

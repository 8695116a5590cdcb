"""RCSR end to end on the small benchmark: anchoring, ablation switches, unimodal clients, bad updates."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from rcsr_ray.data.federation import build_federation
from rcsr_ray.data.partition import PAIRED
from rcsr_ray.fl.client import (ClientSettings, ClientUpdate, ClientWorker, GlobalState, anchor_loss,
                                anchor_targets)
from rcsr_ray.fl.rcsr import AUTO_HISTORY_DIMS, UpdateHistory
from rcsr_ray.fl.strategy import make_strategy
from rcsr_ray.runtime.loop import run_simulation

S4 = {"partition.missing_rate": 0.5, "fed.participation": 1.0, "fed.method": "rcsr", "rcsr.router_hidden": 32}


def _setup(small_config, **over):
    cfg = small_config(**{**S4, **over})
    fed = build_federation(cfg)
    strategy = make_strategy(cfg, fed.num_clients, fed.partition.num_clusters, fed.store.dim)
    worker = ClientWorker(fed, cfg.model.adapter.bottleneck)
    return cfg, fed, strategy, worker


def _round(strategy, worker, fed, params, r, cfg):
    state = strategy.broadcast(r, params)
    updates = [worker.update(c, state, strategy.client_settings(r), cfg.seed, r) for c in range(fed.num_clients)]
    return updates, *strategy.aggregate(r, params, updates)


def test_anchoring_reduces_distance_to_prototypes(small_config):
    cfg, fed, strategy, worker = _setup(small_config)
    shard = fed.shard(0)
    d = fed.store.dim
    g = torch.Generator().manual_seed(0)
    protos = {"image": torch.nn.functional.normalize(torch.randn(fed.partition.num_clusters, d, generator=g), dim=-1),
              "text": torch.nn.functional.normalize(torch.randn(fed.partition.num_clusters, d, generator=g), dim=-1),
              "seen": torch.ones(fed.partition.num_clusters, 2, dtype=torch.bool)}
    slots = torch.from_numpy(shard.clusters)
    params = worker.model.flat.clone()

    def distance(p):
        worker.model.load_flat(p)
        with torch.no_grad():
            img, txt = worker.model.encode(torch.from_numpy(shard.image_emb), None)
            return float(anchor_loss(img, None, slots, protos))

    before = distance(params)
    settings = ClientSettings(3, 32, 1e-2, 0.0, 0.07, anchor_weight=1.0)
    image_only = shard.__class__(**{**shard.__dict__, "modality": 1})
    worker._train(params, params, image_only, slots, protos, settings, torch.Generator().manual_seed(0), {})
    after = distance(worker.model.flat.clone())
    assert after < before - 0.05, (before, after)


def _anchor_loss_picking_rows(img, txt, slots, protos, mode):
    """anchor_loss as it was written first: rows picked by `seen` at every step, the picked prototypes
    normalised at every step."""
    terms = []
    for emb, target, col in ((img, "text", 1), (txt, "image", 0)):
        seen = protos["seen"][slots, col]
        if not seen.any():
            continue
        emb, where = emb[seen], slots[seen]
        if mode == "centroid":
            where, inverse, counts = torch.unique(where, return_inverse=True, return_counts=True)
            means = emb.new_zeros(len(where), emb.shape[1]).index_add(0, inverse, emb)
            cos = torch.nn.functional.cosine_similarity(means, protos[target][where], dim=-1)
            terms.append(((1 - cos) * counts).sum() / counts.sum())
        else:
            goal = torch.nn.functional.normalize(protos[target][where], dim=-1)
            terms.append((1 - (emb * goal).sum(-1)).mean())
    return torch.stack(terms).mean() if terms else torch.zeros(())


@pytest.mark.parametrize("mode", ["instance", "centroid"])
@pytest.mark.parametrize("seen_share", [0.0, 0.6, 1.0])
def test_anchor_loss_on_prepared_targets_has_the_same_bits(mode, seen_share):
    """Prototypes normalised once (`anchor_targets`), and no row selection when every sample's cluster
    is seen, give the loss and gradients of picking rows and normalising them at every step."""
    g = torch.Generator().manual_seed(1)
    clusters, d = 7, 16
    protos = {"image": torch.randn(clusters, d, generator=g), "text": torch.randn(clusters, d, generator=g),
              "seen": torch.rand(clusters, 2, generator=g) < seen_share}
    slots = torch.randint(clusters, (20,), generator=g)
    results = []
    for loss_fn, targets in ((_anchor_loss_picking_rows, protos), (anchor_loss, anchor_targets(protos)),
                             (anchor_loss, protos)):
        img = torch.nn.functional.normalize(torch.randn(20, d, generator=torch.Generator().manual_seed(2)), dim=-1)
        txt = torch.nn.functional.normalize(torch.randn(20, d, generator=torch.Generator().manual_seed(3)), dim=-1)
        img.requires_grad_(), txt.requires_grad_()
        loss = loss_fn(img, txt, slots, targets, mode)
        if loss.requires_grad:
            loss.backward()
        results.append((loss.detach(), img.grad, txt.grad))
    (a, *grads_a) = results[0]
    for b, *grads_b in results[1:]:
        assert torch.equal(a, b)
        assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(grads_a, grads_b))
    assert (a > 0) == (seen_share > 0)  # the term is there exactly when some sample's cluster is seen
    assert anchor_targets(None) is None


def test_anchoring_off_removes_the_term(small_config):
    # With anchoring off (and the same proximal weight) an RCSR client update equals a FedProx one.
    cfg, fed, strategy, worker = _setup(small_config, **{"rcsr.anchoring": False})
    assert strategy.broadcast(1, worker.model.flat).prototypes is None
    assert strategy.client_settings(1).anchor_weight == 0.0
    paired = int(np.flatnonzero(fed.partition.modality == PAIRED)[0])
    params = worker.model.flat.clone()
    protos = {"image": torch.randn(fed.partition.num_clusters, fed.store.dim),
              "text": torch.randn(fed.partition.num_clusters, fed.store.dim),
              "seen": torch.ones(fed.partition.num_clusters, 2, dtype=torch.bool)}
    a = worker.update(paired, GlobalState(params, protos), strategy.client_settings(1), 0, 1)
    prox = ClientSettings.from_config(cfg, prox_mu=cfg.rcsr.prox_mu)
    b = worker.update(paired, GlobalState(params), prox, 0, 1)
    assert torch.equal(a.delta, b.delta)
    on = _setup(small_config)[2].client_settings(1)
    c = worker.update(paired, GlobalState(params, protos), on, 0, 1)
    assert not torch.equal(a.delta, c.delta)


def test_unimodal_clients_contribute_and_switches_change_only_their_piece(small_config):
    cfg, fed, strategy, worker = _setup(small_config)
    params = worker.model.flat.clone()
    for r in (1, 2):
        updates, params, metrics = _round(strategy, worker, fed, params, r, cfg)
    unimodal = [u for u in updates if u.modality != PAIRED]
    assert unimodal and all(u.delta is not None and u.delta.abs().sum() > 0 for u in unimodal)
    diag = pd.DataFrame(strategy.diagnostics)
    last = diag[diag["round"] == 2]
    assert abs(last["fused_weight"].sum() - 1) < 1e-9
    assert last["router_weight"].std() > 0  # the router discriminates
    assert not np.allclose(last["q"], 1 / fed.num_clients)  # minimax moved q
    assert math.isfinite(metrics["router_loss"]) and metrics["weight_entropy"] > 0

    _, _, off_router, w_off = _setup(small_config, **{"rcsr.router": False})
    p = w_off.model.flat.clone()
    for r in (1, 2):
        _, p, m = _round(off_router, w_off, fed, p, r, cfg)
    d = pd.DataFrame(off_router.diagnostics)
    d2 = d[d["round"] == 2]
    np.testing.assert_allclose(d2["router_weight"], 1 / len(d2))
    assert not np.allclose(d2["q"], 1 / fed.num_clients)  # minimax still on
    assert math.isnan(m["router_loss"])

    _, _, off_mm, w_mm = _setup(small_config, **{"rcsr.minimax": False})
    p = w_mm.model.flat.clone()
    for r in (1, 2):
        _round(off_mm, w_mm, fed, p, r, cfg)
    d = pd.DataFrame(off_mm.diagnostics)
    np.testing.assert_allclose(d["q"], 1 / fed.num_clients)
    assert d[d["round"] == 2]["router_weight"].std() > 0  # router still on


def test_non_finite_update_rejected(small_config):
    cfg, fed, strategy, worker = _setup(small_config)
    params = worker.model.flat.clone()
    updates, _, _ = _round(strategy, worker, fed, params, 1, cfg)
    bad = [u for u in updates if u.delta is not None][0]
    bad.delta = bad.delta.clone()
    bad.delta[0] = float("nan")
    new, metrics = strategy.aggregate(2, params, updates)
    assert metrics["rejected_updates"] == 1
    assert torch.isfinite(new).all()
    fedavg = make_strategy(small_config(), fed.num_clients, fed.partition.num_clusters, fed.store.dim)
    inf = ClientUpdate(0, PAIRED, 10, torch.full_like(params, float("inf")))
    new, metrics = fedavg.aggregate(1, params, [inf])
    assert metrics["rejected_updates"] == 1 and torch.equal(new, params)


def test_rcsr_run_writes_router_diagnostics(small_config, tmp_path):
    cfg = small_config(**S4)
    result = run_simulation(cfg, tmp_path / "run", progress=False)
    diag = pd.read_csv(tmp_path / "run" / "router.csv")
    assert set(diag.columns) >= {"round", "client", "fused_weight", "router_weight", "q"}
    assert diag.groupby("round")["fused_weight"].sum().between(0.999, 1.001).all()
    # Modalities named as in clients.csv (paired, image-only, text-only), client by client.
    named = pd.read_csv(tmp_path / "run" / "clients.csv").set_index("client")["modality"]
    assert diag["modality"].tolist() == named[diag["client"]].tolist()
    assert set(diag["modality"]) == {"paired", "image-only", "text-only"}
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert {"weight_entropy", "router_loss", "prototype_coherence"} <= set(metrics.columns)
    assert result.summary["method"] == "rcsr" and math.isfinite(result.summary["mean_r1"])


def test_centroid_anchoring_moves_clusters_without_collapsing_them(small_config):
    cfg, fed, strategy, worker = _setup(small_config)
    shard = fed.shard(0)
    image_only = shard.__class__(**{**shard.__dict__, "modality": 1})
    d, k = fed.store.dim, fed.partition.num_clusters
    g = torch.Generator().manual_seed(0)
    protos = {"image": torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=-1),
              "text": torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=-1),
              "seen": torch.ones(k, 2, dtype=torch.bool)}
    slots = torch.from_numpy(shard.clusters)
    params = worker.model.flat.clone()
    x = torch.from_numpy(shard.image_emb)

    def measure():
        with torch.no_grad():
            emb = worker.model.image(x)
        centroid = float(anchor_loss(emb, None, slots, protos, "centroid"))
        spread = float(1 - (emb @ emb.T).mean())  # how far apart the client's embeddings stay
        return centroid, spread

    worker.model.load_flat(params)
    c0, s0 = measure()
    result = {}
    for mode in ("instance", "centroid"):
        settings = ClientSettings(3, 32, 1e-2, 0.0, 0.07, anchor_weight=1.0, anchor_mode=mode)
        worker._train(params, params, image_only, slots, protos, settings, torch.Generator().manual_seed(0), {})
        result[mode] = measure()
    assert result["centroid"][0] < c0 - 0.05  # clusters moved toward their targets
    assert result["centroid"][1] > result["instance"][1]  # instances kept apart better
    assert result["instance"][1] < s0


def test_personal_switch_changes_only_personal_adapters(small_config):
    cfg, fed, on, worker_on = _setup(small_config, **{"rcsr.personal": True})
    _, _, off, worker_off = _setup(small_config)
    params = worker_on.model.flat.clone()
    for r in (1, 2):
        updates_on, params_on, _ = _round(on, worker_on, fed, params, r, cfg)
        updates_off, params_off, _ = _round(off, worker_off, fed, params, r, cfg)
        assert torch.equal(params_on, params_off)
        params = params_on
    paired = [int(c) for c in np.flatnonzero(fed.partition.modality == PAIRED)]
    assert all("personal" in worker_on.state[c] for c in paired)
    assert not any("personal" in s for s in worker_off.state.values())


def test_server_computes_cosine_to_each_clients_previous_update(small_config):
    """Update geometry: the client reports norm, image share and norm / sqrt(n); the server adds the
    cosine to that client's previous accepted update, which it keeps (clients keep nothing)."""
    cfg, fed, strategy, worker = _setup(small_config)
    params = worker.model.flat.clone()
    first, _, _ = _round(strategy, worker, fed, params, 1, cfg)
    trained = [u for u in first if u.delta is not None]
    assert trained and all(worker.state[u.client_id] == {} for u in trained)
    for u in trained:
        assert u.geometry.shape == (3,)
        torch.testing.assert_close(u.geometry[0], u.delta.norm())
        torch.testing.assert_close(u.geometry[2], u.delta.norm() / u.num_samples ** 0.5)
        assert strategy.history.codes[u.client_id][0] is u.delta  # small federation: kept whole
    u = trained[0]
    # A made-up next update of that client: the cosine to its first one, by hand.
    nxt = ClientUpdate(u.client_id, u.modality, u.num_samples, 2 * u.delta + torch.roll(u.delta, 1))
    nxt.geometry = torch.stack([nxt.delta.norm(), torch.tensor(0.5), nxt.delta.norm() / 3])
    expected = float(nxt.delta.double() @ u.delta.double() / (nxt.delta.double().norm() * u.delta.double().norm()))
    geometry = strategy.geometry(nxt, strategy.history.code(nxt.delta))
    assert geometry.shape == (4,) and 0.5 < expected < 1
    assert math.isclose(float(geometry[2]), expected, rel_tol=1e-5)
    assert float(geometry[1]) == 0.5
    # A client never seen before has cosine 0.
    unseen = ClientUpdate(10 ** 6, u.modality, 5, u.delta, geometry=u.geometry)
    assert float(strategy.geometry(unseen, u.delta)[2]) == 0.0


def test_update_history_sketches_estimate_the_cosine_in_bounded_memory():
    """Count sketches of 4096 buckets estimate the cosine of two 132k-parameter updates within 0.05
    (about 2.5 standard deviations), keep 4096 floats a client, and are fixed by the seed; auto keeps
    updates whole while all clients' fit in 1 GiB."""
    g = torch.Generator().manual_seed(0)
    size = 132_224  # a bottleneck-64 adapter pair on 512-d features
    a = torch.randn(size, generator=g)
    noise = torch.randn(size, generator=g)
    history = UpdateHistory(4096, 10_000, seed=3)
    code_a = history.code(a)
    assert code_a.shape == (4096,) and code_a.dtype == torch.float32
    history.keep(7, code_a, a.norm())
    for target in (0.9, 0.3, 0.0, -0.6):
        b = target * a + math.sqrt(1 - target ** 2) * noise  # cosine to a: about `target`
        exact = float(b.double() @ a.double() / (b.double().norm() * a.double().norm()))
        estimate = float(history.cosine(7, history.code(b), b.norm()))
        assert abs(estimate - exact) < 0.05, (target, exact, estimate)
    assert torch.equal(UpdateHistory(4096, 10_000, seed=3).code(a), code_a)
    assert not torch.equal(UpdateHistory(4096, 10_000, seed=4).code(a), code_a)
    assert float(history.cosine(8, code_a, a.norm())) == 0.0  # a client's first update
    # auto: 1,000 clients x 132k parameters x 4 bytes = 0.53 GB stay whole; 10,000 (5.3 GB) are sketched
    small, large = UpdateHistory(None, 1_000, 0), UpdateHistory(None, 10_000, 0)
    assert small.code(a) is a and small.dims == 0
    assert large.code(a).shape == (AUTO_HISTORY_DIMS,) and large.dims == AUTO_HISTORY_DIMS
    assert UpdateHistory(0, 10_000, 0).code(a) is a  # asked for whole updates: kept whole


def test_sketched_history_gives_cosines_close_to_the_exact_ones(small_config):
    """RCSR with rcsr.history_dims=1024: the round-1 updates its server step kept are sketches of
    1024 floats, and round 2's cosines to them come out close to the exact ones (4.3k parameters
    here)."""
    cosines = {}
    for dims in (0, 1024):
        cfg, fed, strategy, worker = _setup(small_config, **{"rcsr.history_dims": dims})
        _, params, _ = _round(strategy, worker, fed, worker.model.flat.clone(), 1, cfg)
        state, settings = strategy.broadcast(2, params), strategy.client_settings(2)
        updates = [worker.update(c, state, settings, cfg.seed, 2) for c in range(fed.num_clients)]
        seen = [u for u in updates if u.delta is not None and u.client_id in strategy.history.codes]
        cosines[dims] = [float(strategy.geometry(u, strategy.history.code(u.delta))[2]) for u in seen]
        strategy.aggregate(2, params, updates)
        assert {code.numel() for code, _ in strategy.history.codes.values()} == {dims or params.numel()}
    exact, sketched = cosines[0], cosines[1024]
    assert len(exact) > 2 and max(exact) - min(exact) > 0.05  # cosines that differ between clients
    assert max(abs(a - b) for a, b in zip(exact, sketched)) < 0.15


def test_strategy_loaded_from_a_state_is_independent_of_its_source(small_config):
    """`state_dict` hands out the live state (a checkpoint writes it at once); `load_state_dict`
    copies it, so the source going on changes nothing in the loaded strategy, and both continue alike."""
    cfg, fed, strategy, worker = _setup(small_config)
    params = worker.model.flat.clone()
    for r in (1, 2):
        _, params, _ = _round(strategy, worker, fed, params, r, cfg)
    loaded = make_strategy(cfg, fed.num_clients, fed.partition.num_clusters, fed.store.dim)
    loaded.load_state_dict(strategy.state_dict())
    kept_q, kept_protos = loaded.q.clone(), loaded.prototypes.image.clone()
    updates, ahead, _ = _round(strategy, worker, fed, params, 3, cfg)  # the source goes on to round 3
    assert not torch.equal(strategy.q, kept_q) and not torch.equal(strategy.prototypes.image, kept_protos)
    assert torch.equal(loaded.q, kept_q) and torch.equal(loaded.prototypes.image, kept_protos)
    assert loaded.router.router is not strategy.router.router and loaded.history.codes is not strategy.history.codes
    same, _ = loaded.aggregate(3, params, updates)
    assert torch.equal(same, ahead)


def test_rcsr_gives_the_same_numbers_whatever_the_process_thread_count(small_config):
    """The server step's sums (router, prototypes) round differently on another intra-op thread
    count, and a process's default follows its machine's cores; the round loop pins the step to
    runtime.server_threads, so a CLI run on many cores, a driver actor and a Tune trial on one core
    agree. At this size the router's products split over threads (unpinned, these runs differ)."""
    cfg = small_config(**{**S4, "fed.participation": 0.5, "partition.num_clients": 20, "data.synthetic.dim": 512,
                          "fed.rounds": 3, "eval.every": 3})
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(run_simulation(cfg, progress=False))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(runs[0].params, runs[1].params)
    drop = lambda row: {k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in runs[0].metrics] == [drop(r) for r in runs[1].metrics]
    assert runs[0].metrics[-1]["router_loss"] == runs[1].metrics[-1]["router_loss"]

"""Baselines (MOON, FedPer), personal adapters, personalized evaluation, and `rcsr-ray compare`."""
import math
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from rcsr_ray.cli import main
from rcsr_ray.data.federation import build_federation
from rcsr_ray.data.partition import PAIRED
from rcsr_ray.eval.personal import summarize_clients
from rcsr_ray.fl.client import ClientSettings, ClientWorker, GlobalState, moon_loss, proximal_term
from rcsr_ray.fl.strategy import make_strategy
from rcsr_ray.models.adapters import AdapterPair, flat_views
from rcsr_ray.runtime.loop import run_simulation
from tests.conftest import SMALL


def _worker(small_config, **over):
    cfg = small_config(**over)
    fed = build_federation(cfg)
    return cfg, fed, ClientWorker(fed, cfg.model.adapter.bottleneck)


def test_personal_parameters_never_sent_and_differ_across_clients(small_config):
    cfg, fed, worker = _worker(small_config, **{"fed.method": "fedper"})
    strategy = make_strategy(cfg, fed.num_clients, fed.partition.num_clusters, fed.store.dim)
    plain = ClientWorker(fed, cfg.model.adapter.bottleneck)
    params = worker.model.flat.clone()
    paired = np.flatnonzero(fed.partition.modality == PAIRED)
    for c in paired:
        sent = worker.update(int(c), GlobalState(params), strategy.client_settings(1), 0, 1)
        fedavg = plain.update(int(c), GlobalState(params), ClientSettings.from_config(cfg), 0, 1)
        # What the client sends is exactly FedAvg's update: no personal parameter is in it or behind it.
        assert torch.equal(sent.delta, fedavg.delta) and sent.params is None
        personal = worker.state[int(c)]["personal"]
        blob = pickle.dumps(sent)
        assert personal.numpy().tobytes()[:4096] not in blob
    personals = [worker.state[int(c)]["personal"] for c in paired]
    assert all(not torch.equal(personals[0], p) for p in personals[1:])
    start = AdapterPair(fed.store.dim, cfg.model.adapter.bottleneck, seed=int(paired[0])).flat
    assert not torch.equal(personals[0], start)  # trained


def test_moon_term_and_update(small_config):
    dim = 8
    glob, prev = AdapterPair(dim, 4, init_scale=0.5, seed=1), AdapterPair(dim, 4, init_scale=0.5, seed=2)
    x = torch.nn.functional.normalize(torch.randn(5, dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        zg, zp = glob.image(x), prev.image(x)
    near_global = moon_loss(zg, None, x, None, glob, prev, 0.5)
    near_prev = moon_loss(zp, None, x, None, glob, prev, 0.5)
    assert near_global < near_prev
    # Hand computation for z = zg: -log(e^{1/t} / (e^{1/t} + e^{cos(zg,zp)/t})).
    cos = (zg * zp).sum(-1)
    expected = torch.log1p(torch.exp((cos - 1) / 0.5)).mean()
    assert torch.allclose(near_global, expected, atol=1e-6)

    cfg, fed, worker = _worker(small_config)
    c = int(np.flatnonzero(fed.partition.modality == PAIRED)[0])
    params = worker.model.flat.clone()
    moon = ClientSettings.from_config(cfg, moon_mu=1.0)
    a = worker.update(c, GlobalState(params), ClientSettings.from_config(cfg), 0, 1)
    # First participation: the previous local model is the global one, the term is constant (FedAvg).
    first = worker.update(c, GlobalState(params), moon, 0, 1)
    assert torch.equal(a.delta, first.delta)
    assert torch.allclose(worker.state[c]["moon_prev"], params + first.delta, atol=1e-6)
    # Later, with a previous local model that differs from the global one, the term acts.
    b = worker.update(c, GlobalState(params), moon, 0, 1)
    assert not torch.equal(a.delta, b.delta)


@pytest.mark.parametrize("mu", [0.01, 0.3, 1.7])
def test_proximal_term_has_autograds_bits(mu):
    """FedProx's term, computed without autograd, gives the value and the summed gradient autograd
    gives for 0.5*mu*sum_p ||p - a||^2 beside another loss, to the bit."""
    g = torch.Generator().manual_seed(3)
    model = AdapterPair(16, 4, init_scale=0.3, seed=1)
    params = list(model.parameters())
    target = model.flat.detach() + 0.1 * torch.randn(model.flat.shape, generator=g)
    x, y = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)

    def other_loss():
        img, txt = model.encode(x, y)
        return (img * txt).sum()

    model.zero_grad()
    by_autograd = other_loss() + 0.5 * mu * sum((p - a).pow(2).sum() for p, a in zip(params, flat_views(target, params)))
    by_autograd.backward()
    expected = model.flat.grad.clone()
    model.zero_grad()
    value, grad = proximal_term(model.flat, target, mu, params)
    loss = other_loss() + value
    loss.backward()
    model.flat.grad.add_(grad)
    assert not value.requires_grad and value > 0
    assert loss.item() == by_autograd.item() and torch.equal(model.flat.grad, expected)
    # The gradient is the term's own: mu * (w - w_global).
    torch.testing.assert_close(grad, mu * (model.flat.detach() - target))


@pytest.mark.parametrize("method", ["fedprox", "rcsr"])
def test_client_updates_with_the_proximal_term_are_autograds(small_config, monkeypatch, method):
    """Client updates with the term's gradient added by hand are, to the bit, those of the loop with
    autograd carrying the term (a `proximal_term` whose value keeps its graph and whose own gradient
    is zero), and differ from updates without the term."""
    import rcsr_ray.fl.client as client

    cfg, fed, worker = _worker(small_config, **{"fed.method": method, "fed.prox_mu": 0.5, "rcsr.prox_mu": 0.5})
    strategy = make_strategy(cfg, fed.num_clients, fed.partition.num_clusters, fed.store.dim)
    params = worker.model.flat.clone()
    state = strategy.broadcast(1, params)
    if method == "rcsr":  # prototypes to anchor to, so that unimodal clients train too
        protos = strategy.prototypes
        state.prototypes = {"image": torch.randn(protos.num_clusters, fed.store.dim),
                            "text": torch.randn(protos.num_clusters, fed.store.dim),
                            "seen": torch.ones(protos.num_clusters, 2, dtype=torch.bool)}
    settings = strategy.client_settings(1)
    assert settings.prox_mu == 0.5

    def updates(s):
        return [worker.update(c, state, s, 0, 1) for c in range(fed.num_clients)]
    by_hand = updates(settings)

    def autograd_term(flat, target, mu, like):
        value = 0.5 * mu * sum((p - a).pow(2).sum() for p, a in zip(like, flat_views(target, like)))
        return value, torch.zeros_like(flat)
    monkeypatch.setattr(client, "proximal_term", autograd_term)
    by_autograd = updates(settings)
    without = updates(ClientSettings(**{**settings.__dict__, "prox_mu": 0.0}))
    trained = [i for i, u in enumerate(by_hand) if u.delta is not None]
    assert len(trained) >= 3
    for i in trained:
        a, b = by_hand[i], by_autograd[i]
        assert torch.equal(a.delta, b.delta) and repr(a.loss) == repr(b.loss) and a.steps == b.steps
    # The term's gradient is 0 at the first step (the weights start at the global ones): it acts from the second.
    several = [i for i in trained if by_hand[i].steps >= 2]
    assert several and all(not torch.equal(by_hand[i].delta, without[i].delta) for i in several)


def test_a_batch_with_only_the_proximal_term_still_steps(small_config):
    """An image-only client anchors only where the text prototype of a sample's cluster exists: a
    batch without such a sample has no loss but FedProx's, which still takes its step, as it did when
    autograd carried the term."""
    cfg, fed, worker = _worker(small_config)
    shard = fed.shard(int(np.flatnonzero(fed.partition.modality == PAIRED)[0]))
    image_only = shard.__class__(**{**shard.__dict__, "modality": 1})  # its captions unused
    slots = torch.from_numpy(shard.clusters)
    seen = torch.zeros(fed.partition.num_clusters, 2, dtype=torch.bool)
    seen[slots[0], :] = True  # only the first sample's cluster has prototypes
    alone = int((slots == slots[0]).sum())
    assert alone < shard.num_images - 2, "the test needs samples outside that cluster"
    protos = {"image": torch.randn(fed.partition.num_clusters, fed.store.dim),
              "text": torch.randn(fed.partition.num_clusters, fed.store.dim), "seen": seen}
    params = worker.model.flat.clone()
    steps = {}
    for mu in (0.0, 0.5):
        settings = ClientSettings(1, 2, 1e-2, 0.0, 0.07, anchor_weight=1.0, prox_mu=mu)
        _, steps[mu] = worker._train(params, params, image_only, slots, protos, settings,
                                     torch.Generator().manual_seed(0), {})
    batches = shard.num_images // 2  # batch 2, one epoch (a last batch of one is skipped)
    assert steps[0.0] <= alone < batches and steps[0.5] == batches


def test_summarize_clients_by_hand():
    frame = pd.DataFrame({"modality": ["paired", "paired", "image-only", "text-only"] + ["paired"] * 7,
                          "i2t_r1": [80, 60, 40, 20] + [100] * 7, "t2i_r1": [60, 40, 20, 0] + [100] * 7})
    s = summarize_clients(frame)
    r1 = np.array([70, 50, 30, 10] + [100] * 7, float)
    assert s["pers_mean_r1"] == pytest.approx(r1.mean())
    assert s["pers_std_r1"] == pytest.approx(r1.std())
    assert s["pers_mean_r1_paired"] == pytest.approx(np.r_[70, 50, [100] * 7].mean())
    assert s["pers_mean_r1_image_only"] == 30 and s["pers_mean_r1_text_only"] == 10
    assert s["pers_worst10_r1"] == pytest.approx(20.0)  # 10% of 11 clients -> the worst 2: 10 and 30
    assert math.isnan(summarize_clients(frame[frame["modality"] == "paired"])["pers_mean_r1_text_only"])


def test_personalized_eval_reports_per_client(small_config, tmp_path):
    cfg = small_config(**{"fed.method": "fedper", "partition.missing_rate": 0.5, "fed.participation": 1.0})
    result = run_simulation(cfg, tmp_path / "run", progress=False)
    clients = pd.read_csv(tmp_path / "run" / "clients.csv")
    assert len(clients) == 6 and set(clients["modality"]) == {"paired", "image-only", "text-only"}
    paired = clients[clients["modality"] == "paired"]
    assert paired["personal_i2t_r1"].notna().all() and clients.loc[clients["modality"] != "paired",
                                                                    "personal_i2t_r1"].isna().all()
    assert (paired["i2t_r1"] == paired["personal_i2t_r1"]).all()
    assert result.summary["pers_mean_r1"] == pytest.approx(((clients["i2t_r1"] + clients["t2i_r1"]) / 2).mean())


def test_compare_command(tmp_path, cache_dir, capsys):
    keys = {**SMALL, "data.cache_dir": cache_dir, "runtime.backend": "local", "fed.rounds": 2}
    out = tmp_path / "cmp"
    code = main(["compare", "--quiet", "--preset", "S4", "--methods", "fedavg,moon,zeroshot", "--seeds", "0,1",
                 "--out", str(out), *[f"{k}={v}" for k, v in keys.items()]])
    assert code == 0
    printed = capsys.readouterr().out
    assert "±" in printed and "moon" in printed and "image-only" in printed
    frame = pd.read_csv(out / "compare.csv")
    assert sorted(zip(frame["method"], frame["seed"])) == sorted(
        (m, s) for m in ("fedavg", "moon", "zeroshot") for s in (0, 1))
    assert {"mean_r1", "pers_mean_r1", "pers_worst10_r1", "pers_std_r1"} <= set(frame.columns)
    # Same partition for every method of a seed.
    a = pd.read_csv(out / "fedavg-seed1" / "partition.csv")
    assert a.equals(pd.read_csv(out / "moon-seed1" / "partition.csv"))
    assert not a.equals(pd.read_csv(out / "fedavg-seed0" / "partition.csv"))
    assert (out / "compare.png").stat().st_size > 10_000
    assert main(["compare", "--methods", "fedavg,nope", *[f"{k}={v}" for k, v in keys.items()]]) == 2
    for bad in (["--methods", ""], ["--methods", "fedavg", "--seeds", ""], ["--methods", "fedavg", "--seeds", "-1"]):
        assert main(["compare", "--out", str(tmp_path / "bad"), *bad, *[f"{k}={v}" for k, v in keys.items()]]) == 2
        assert capsys.readouterr().err.startswith("rcsr-ray: config error: --")
    assert not (tmp_path / "bad").exists()


def test_compare_runs_each_method_once_on_the_configs_seed(tmp_path, cache_dir, capsys):
    keys = {**SMALL, "data.cache_dir": cache_dir, "runtime.backend": "local", "fed.rounds": 1, "seed": 5}
    out = tmp_path / "cmp"
    assert main(["compare", "--quiet", "--methods", "zeroshot,fedavg,zeroshot", "--out", str(out),
                 *[f"{k}={v}" for k, v in keys.items()]]) == 0
    frame = pd.read_csv(out / "compare.csv")
    assert list(zip(frame["method"], frame["seed"])) == [("zeroshot", 5), ("fedavg", 5)]
    capsys.readouterr()
    # Again with another learning rate: fedavg's folder holds the first run, so nothing runs at all.
    keys["train.lr"] = 0.005
    assert main(["compare", "--quiet", "--methods", "central,fedavg", "--out", str(out),
                 *[f"{k}={v}" for k, v in keys.items()]]) == 2
    assert "fedavg-seed5: holds a run of another config (train.lr: 0.001 -> 0.005)" in capsys.readouterr().err
    assert not (out / "central-seed5").exists()


def test_training_rounds_per_method(small_config):
    """What the loop, the driver's progress bar and a sweep's actor count read: zero-shot trains nothing."""
    from rcsr_ray.fl.strategy import training_rounds

    assert training_rounds(small_config(**{"fed.method": "zeroshot"})) == 0
    for method in ("fedavg", "rcsr", "central", "local", "moon"):
        cfg = small_config(**{"fed.method": method, "fed.rounds": 7})
        assert training_rounds(cfg) == 7, method

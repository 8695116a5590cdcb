"""The local and Ray backends run the same client code and must agree bit for bit."""
import numpy as np
import torch

from rcsr_ray.runtime.loop import run_simulation


def test_fedavg_local_and_ray_bit_identical(small_config, ray_session):
    local = run_simulation(small_config(), progress=False)
    packed = run_simulation(small_config(**{"runtime.backend": "ray"}), progress=False)
    one_per_actor = run_simulation(small_config(**{"runtime.backend": "ray", "runtime.clients_per_actor": 1,
                                                   "runtime.client_cpus": 0.25}), progress=False)
    assert torch.equal(local.params, packed.params)
    assert torch.equal(local.params, one_per_actor.params)
    fedper_local = run_simulation(small_config(**{"fed.method": "fedper"}), progress=False)
    fedper_ray = run_simulation(small_config(**{"fed.method": "fedper", "runtime.backend": "ray"}), progress=False)
    assert fedper_local.clients.equals(fedper_ray.clients)  # personal adapters evaluated inside the actors
    assert fedper_ray.clients["personal_i2t_r1"].notna().any()
    drop = lambda row: {k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in local.metrics] == [drop(r) for r in packed.metrics]
    # It trained: weights moved and retrieval changed from zero-shot.
    assert not torch.equal(local.params, torch.zeros_like(local.params))
    assert local.summary["mean_r1"] != local.summary["zeroshot"]["mean_r1"]


def test_same_seed_same_result_other_seed_differs(small_config):
    a = run_simulation(small_config(), progress=False)
    b = run_simulation(small_config(), progress=False)
    c = run_simulation(small_config(seed=1), progress=False)
    assert torch.equal(a.params, b.params)
    assert not torch.equal(a.params, c.params)


def test_unimodal_clients_sit_out_fedavg(small_config):
    from rcsr_ray.data.federation import build_federation
    from rcsr_ray.fl.client import GlobalState
    from rcsr_ray.fl.strategy import make_strategy
    from rcsr_ray.runtime.backends import LocalBackend

    cfg = small_config(**{"partition.missing_rate": 0.5})
    fed = build_federation(cfg)
    strategy = make_strategy(cfg, fed.num_clients, fed.partition.num_clusters, fed.store.dim)
    backend = LocalBackend(fed, cfg)
    params = torch.zeros(backend.worker.model.flat.numel())
    updates, failed = backend.train(GlobalState(params), np.arange(fed.num_clients), strategy.client_settings(1),
                                    cfg.seed, 1)
    assert failed == []
    trained = {u.client_id for u in updates if u.delta is not None}
    paired = set(np.flatnonzero(fed.partition.modality == 0).tolist())
    assert trained == paired and len(paired) == 3
    _, metrics = strategy.aggregate(1, params, updates)
    assert metrics["trained_clients"] == 3


def test_balance_work_moves_few_clients_toward_equal_loads():
    from rcsr_ray.runtime.ray_backend import balance_work

    work = np.array([10, 10, 10, 10, 0, 10, 3])
    # Actor 0 holds 40, actor 1 holds 10: one 10 moves (the gap drops 30 -> 10); then nothing
    # smaller than the gap is left on the heavier actor.
    assert balance_work({0: [0, 1, 2, 3], 1: [5]}, work, 2) == {0: [1, 2, 3], 1: [0, 5]}
    # The 3 brings 13 vs 10 to 10 vs 13 at best: no move narrows the gap, everyone stays home.
    assert balance_work({0: [5, 6], 1: [0]}, work, 2) == {0: [5, 6], 1: [0]}
    # An idle actor gets work; a zero-work client never moves; one actor: nothing to balance.
    assert balance_work({0: [0, 1, 4]}, work, 2) == {0: [1, 4], 1: [0]}
    assert balance_work({0: [0, 1, 2]}, work, 1) == {0: [0, 1, 2]}


def test_stateless_rounds_are_rebalanced_and_stay_identical(small_config, ray_session):
    """RCSR without personal adapters keeps no client state, so the Ray backend balances its rounds
    over the actors and runs some clients away from home; results stay bit-identical to local."""
    from rcsr_ray.data.federation import build_federation
    from rcsr_ray.fl.strategy import make_strategy
    from rcsr_ray.runtime.ray_backend import balance_work

    keys = {"fed.method": "rcsr", "partition.alpha": 0.1, "partition.missing_rate": 0.5}
    cfg = small_config(**keys)
    fed = build_federation(cfg)
    strategy = make_strategy(cfg, fed.num_clients, fed.partition.num_clusters, fed.store.dim)
    assert not strategy.client_settings(1).keeps_client_state
    assert make_strategy(small_config(**keys, **{"rcsr.personal": True}), fed.num_clients,
                         fed.partition.num_clusters, fed.store.dim).client_settings(1).keeps_client_state
    # The session's Ray has 2 CPUs: two actors of 3 clients; count the clients sent away from home.
    moved = 0
    for r in range(1, cfg.fed.rounds + 1):
        home: dict[int, list[int]] = {}
        for c in strategy.sample(r, fed.num_clients):
            home.setdefault(int(c) // 3, []).append(int(c))
        moved += sum(c // 3 != a for a, cs in balance_work(home, fed.client_sizes, 2).items() for c in cs)
    assert moved > 0
    local = run_simulation(cfg, progress=False)
    ray_run = run_simulation(small_config(**keys, **{"runtime.backend": "ray"}), progress=False)
    assert torch.equal(local.params, ray_run.params)
    drop = lambda row: {k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in local.metrics] == [drop(r) for r in ray_run.metrics]

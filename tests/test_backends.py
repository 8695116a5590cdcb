"""The local and Ray backends run the same client code and must agree bit for bit."""
import os

import numpy as np
import pytest
import torch

from rcsr_ray.models.adapters import initial_params
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
    cfg = small_config()
    a = cfg.model.adapter
    assert not torch.equal(local.params, initial_params(cfg.data.synthetic.dim, a.bottleneck, a.init_scale, cfg.seed))
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


def test_round_schedule_hands_out_home_first_then_takes_over():
    from rcsr_ray.runtime.schedule import RoundSchedule

    work = np.array([4, 1, 2, 8, 0, 3])
    s = RoundSchedule({0: [0, 1, 2, 3], 1: [5]}, work, 2, steal=True)
    # A worker gets half of what levels it with the others: the work not yet done (18) over the 2
    # workers, less what it already holds; at least one client. Own clients first, largest first.
    assert s.next_chunk(0) == [3]  # needs 9: up to 4.5
    assert s.next_chunk(1) == [5]  # needs 9
    # Worker 1's own are handed out: it takes worker 0's smallest (1, then 2) within (9 - 3) / 2.
    assert s.next_chunk(1) == [1, 2]
    # Worker 0 holds 8 of the 18 not done: it needs 1 more, less than its last client (4), which
    # waits for whoever runs out first; worker 1 holds 6 and needs 3, so it waits too.
    assert s.next_chunk(0) == [] and s.next_chunk(1) == []
    s.done(1, [5])
    assert s.next_chunk(1) == [0]  # holds 3 of the 15 not done: needs 4.5
    assert s.next_chunk(0) == [] and s.next_chunk(1) == [] and s.remaining() == []
    # A worker that holds nothing gets a client however far that takes it past the level.
    s = RoundSchedule({0: [0, 1, 2, 3], 1: []}, work, 2, steal=True)
    assert s.next_chunk(0) == [3]  # needs 7.5 of 15
    assert s.next_chunk(0) == []  # holds 8 > 7.5
    assert s.next_chunk(1) == [1, 2]  # needs 7.5: up to 3.75, from worker 0's smallest
    s.done(0, [3])
    assert s.next_chunk(0) == [0] and s.remaining() == []
    # Without stealing (updates keep client state) a worker only ever runs its own clients; a
    # failed worker gets nothing more, and what it never started is left over.
    s = RoundSchedule({0: [0, 1], 1: [5]}, work, 2, steal=False)
    assert s.next_chunk(1) == [5] and s.next_chunk(1) == []
    s.close(0)
    assert s.next_chunk(0) == [] and s.remaining() == [0, 1]
    # With stealing, the failed worker's clients go to the others (smallest first, 5 / 2 per chunk).
    s = RoundSchedule({0: [0, 4, 1], 1: []}, work, 2, steal=True)
    s.close(0)
    assert s.next_chunk(1) == [4, 1] and s.next_chunk(1) == [0] and s.remaining() == []
    # A worker that died hands back the chunk it never started; the others take it over.
    s = RoundSchedule({0: [0, 1], 1: [5]}, work, 2, steal=True)
    assert s.next_chunk(0) == [0]
    s.close(0)
    s.give_back(0, [0])
    assert s.next_chunk(1) == [5] and s.next_chunk(1) == [0] and s.next_chunk(1) == [1]
    assert s.next_chunk(1) == [] and s.remaining() == []


def test_round_schedule_drains_its_tail_and_takes_it_back():
    from rcsr_ray.runtime.schedule import RoundSchedule

    work = np.array([4, 1, 2, 8, 0, 3])
    s = RoundSchedule({0: [0, 1, 2, 3], 1: [5]}, work, 2, steal=True)
    assert s.next_chunk(0) == [3] and s.queued() == 4
    assert s.drain() == [0, 5, 2, 1]  # all not handed out, largest first (for a tail pool)
    assert s.queued() == 0 and s.next_chunk(1) == [] and s.remaining() == []
    s.handed(1, [])  # an empty chunk, sent so that worker 1 claims from the pool
    assert s.chunks_held[1] == 1
    s.done(1, [])
    assert s.chunks_held[1] == 0
    s.put_back(0, [1, 2])  # nobody claimed them: back in worker 0's queue, largest first
    assert s.queued() == 2 and s.next_chunk(1) == [1] and s.next_chunk(1) == [2] and s.remaining() == []


def test_shared_rows_hand_over_rows_and_clean_up(tmp_path):
    from rcsr_ray.runtime.shared_rows import PREFIX, RowWriter, SharedRows

    # A killed driver's matrix (no such pid) is removed by the next driver; a live one's is not.
    orphan, alive = tmp_path / f"{PREFIX}999999999-abc", tmp_path / f"{PREFIX}{os.getpid()}-abc"
    orphan.write_bytes(b"x")
    alive.write_bytes(b"x")
    shared = SharedRows.create(3, 5, directory=str(tmp_path))
    assert not orphan.exists() and alive.exists()
    assert shared.shape == (3, 5) and os.path.getsize(shared.path) == 3 * 5 * 4  # reserved up front
    writer = RowWriter()
    rows = writer.open(shared.path, (3, 5))
    rows[1] = np.arange(5, dtype=np.float32)
    got = shared.row(1)
    assert got.tolist() == [0, 1, 2, 3, 4] and shared.row(0).tolist() == [0] * 5
    rows[1] = -1  # the next round writes the row again: what was read stays
    assert got.tolist() == [0, 1, 2, 3, 4]
    assert writer.open(shared.path, (3, 5)) is rows  # opened once
    assert writer.open(str(tmp_path / "elsewhere"), (3, 5)) is None  # not on this machine
    shared.close()
    assert not os.path.exists(shared.path)
    assert SharedRows.create(3, 5, directory=str(tmp_path / "missing")) is None


def test_broadcast_prototypes_ride_in_row_zero_where_they_fit():
    from rcsr_ray.fl.rcsr_server import GlobalPrototypes
    from rcsr_ray.fl.client import GlobalState
    from rcsr_ray.runtime.ray_backend import RoundArgs, _state_from_row, _state_into_row

    protos = GlobalPrototypes(3, 4)
    protos.update([{"image_sum": torch.randn(3, 4), "image_count": torch.tensor([2.0, 0.0, 1.0]),
                    "text_sum": torch.randn(3, 4), "text_count": torch.tensor([0.0, 3.0, 1.0])}],
                  torch.ones(1, dtype=torch.float64))
    view = protos.client_view()
    assert view["seen"].tolist() == [[True, False], [False, True], [True, True]]
    tail = np.full(2 * 3 * 4 + 3 * 2 + 5, np.nan, dtype=np.float32)  # room to spare
    where = _state_into_row(tail, view)
    assert [name for name, _, _ in where] == ["image", "text", "seen"]
    got = _state_from_row(tail, where)
    for name in view:
        assert got[name].dtype == view[name].dtype and torch.equal(got[name], view[name])
    assert np.isnan(tail[-5:]).all()  # nothing written past them
    tail[:] = 0  # the next round writes the row again: what was read stays
    assert torch.equal(got["image"], view["image"])
    # Where they do not fit, or are of another dtype, nothing is written: they travel in the round.
    short = np.zeros(2 * 3 * 4 + 3 * 2 - 1, dtype=np.float32)
    assert _state_into_row(short, view) is None and not short.any()
    assert _state_into_row(tail, {"image": view["image"].double()}) is None
    assert _state_into_row(tail, None) is None
    # The light round an actor on this machine gets leaves them out when they are in the row.
    full = RoundArgs(1, GlobalState(torch.zeros(3), view), None, 0, 1, 0, {}, None, [None])
    assert full.light(where).state.prototypes is None and full.light(where).state_row == where
    assert full.light(None).state.prototypes is view and full.state.prototypes is view


def test_tail_pool_hands_the_last_clients_to_whoever_is_free(tmp_path):
    from rcsr_ray.runtime.shared_rows import TailPool

    driver = TailPool(2, 6, directory=str(tmp_path))
    actor0, actor1 = (TailPool(2, 6, path=driver.path) for _ in range(2))  # as two actors open it
    driver.start(7)
    driver.sent_task(0)
    driver.sent_task(1)
    assert actor0.claim(7, 0, 1) is None and driver.left() == 0  # nothing in the pool yet
    driver.fill([10, 11, 12, 13], [0, 0, 1, 0])  # largest first, with their home actors
    assert driver.left() == 4
    assert actor0.claim(6, 0, 1) is None  # another call's pool
    driver.sent_task(0)
    assert actor0.claim(7, 0, 1) is None  # a second task is queued on actor 0: it runs that first
    assert actor0.claim(7, 0, 2) == 10  # its own, largest first
    assert actor1.claim(7, 1, 1) == 12  # its own
    assert actor1.claim(7, 1, 1) == 13  # then the smallest of the others'
    assert driver.claimed_by(1) == [12, 13] and driver.claimed_by(0) == [10] and driver.left() == 1
    driver.close(1)
    assert actor1.claim(7, 1, 1) is None  # failed: it claims nothing more this call
    assert driver.take_back() == [11] and driver.left() == 0
    assert actor0.claim(7, 0, 2) is None  # taken back: nobody can claim it
    # A new call starts empty, and a closed pool gives nothing to anyone.
    driver.start(8)
    driver.sent_task(1)
    driver.fill([20], [0])
    driver.close()
    assert actor1.claim(8, 1, 1) is None and driver.take_back() == [20]
    for pool in (actor0, actor1):
        pool.release()
    path = driver.path
    driver.release()
    assert not os.path.exists(path)


def test_update_writes_its_delta_and_prototypes_where_asked(small_config):
    """A delta and prototypes written straight into a given row (as into a backend's shared matrix)
    are the same, bit for bit, as ones made fresh, for a training client and for one that sits the
    round out; a row of another size is left alone."""
    from rcsr_ray.data.federation import build_federation
    from rcsr_ray.fl.client import ClientWorker, RowLayout
    from rcsr_ray.fl.strategy import make_strategy
    from rcsr_ray.models.adapters import initial_params

    cfg = small_config(**{"fed.method": "rcsr", "partition.missing_rate": 0.5})
    fed = build_federation(cfg)
    strategy = make_strategy(cfg, 6, fed.partition.num_clusters, fed.store.dim)
    params = initial_params(fed.store.dim, cfg.model.adapter.bottleneck, 0.01, cfg.seed)
    state, settings = strategy.broadcast(1, params), strategy.client_settings(1)
    layout = RowLayout.of(params.numel(), settings, fed.store.dim)
    assert layout.width == params.numel() + 2 * fed.partition.num_clusters * (fed.store.dim + 1)
    worker = ClientWorker(fed, cfg.model.adapter.bottleneck)
    fresh = {c: worker.update(c, state, settings, cfg.seed, 1) for c in range(6)}
    assert {u.delta is None for u in fresh.values()} == {True, False}  # some train, some sit out
    for client, made in fresh.items():
        matrix = np.full((2, layout.width), np.nan, np.float32)
        row = torch.from_numpy(matrix[1])
        written = worker.update(client, state, settings, cfg.seed, 1, out=row)
        if made.delta is None:
            assert written.delta is None and np.isnan(matrix[1, :layout.params]).all()
        else:
            assert written.delta.data_ptr() == row.data_ptr() and torch.equal(written.delta, made.delta)
            assert torch.equal(written.geometry, made.geometry)  # computed from the delta in place
        assert written.prototypes.keys() == made.prototypes.keys() and len(made.prototypes) in (2, 4)
        views = layout.prototypes(row[layout.params:])
        for name, value in made.prototypes.items():
            assert written.prototypes[name].data_ptr() == views[name].data_ptr()
            assert torch.equal(written.prototypes[name], value) and torch.equal(views[name], value)
        assert np.isnan(matrix[0]).all()
    client = next(c for c, u in fresh.items() if u.delta is not None)
    wrong = torch.zeros(layout.width - 1)
    other = worker.update(client, state, settings, cfg.seed, 1, out=wrong)
    assert torch.equal(other.delta, fresh[client].delta) and not wrong.any()
    assert all(torch.equal(t, fresh[client].prototypes[k]) for k, t in other.prototypes.items())


def test_worker_counts_the_cpu_its_updates_take(small_config):
    """`update_cpu_s` adds up the CPU time of the worker's updates (what round_overhead.py sets the
    actors' updates against the local backend's with), and nothing spent between them."""
    import time

    from rcsr_ray.data.federation import build_federation
    from rcsr_ray.fl.client import ClientSettings, ClientWorker, GlobalState
    from rcsr_ray.models.adapters import initial_params

    cfg = small_config()
    fed = build_federation(cfg)
    worker = ClientWorker(fed, cfg.model.adapter.bottleneck)
    state = GlobalState(initial_params(fed.store.dim, cfg.model.adapter.bottleneck, 0.01, cfg.seed))
    settings = ClientSettings.from_config(cfg)
    assert worker.update_cpu_s == 0.0
    started = time.thread_time()
    for c in range(6):
        worker.update(c, state, settings, cfg.seed, 1)
    assert 0.0 < worker.update_cpu_s <= time.thread_time() - started
    counted, busy = worker.update_cpu_s, time.thread_time()
    while time.thread_time() - busy < 0.05:  # CPU spent outside any update
        pass
    assert worker.update_cpu_s == counted
    worker.update(0, state, settings, cfg.seed, 2)
    assert worker.update_cpu_s > counted


@pytest.mark.parametrize("shared", [
    pytest.param(True, id="shared-memory", marks=pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")),
    pytest.param(False, id="object-store")])
def test_stateless_rounds_are_taken_over_and_stay_identical(small_config, ray_session, shared):
    """RCSR without personal adapters keeps no client state: an actor done with its own clients
    runs some of another's, and the results stay bit-identical to the local backend, whether the
    deltas come back through shared memory (actors on the driver's machine) or as task results
    (actors elsewhere, played here by a driver that claims another node)."""
    from rcsr_ray.data.federation import build_federation
    from rcsr_ray.fl.strategy import make_strategy
    from rcsr_ray.models.adapters import initial_params
    from rcsr_ray.runtime.backends import LocalBackend
    from rcsr_ray.runtime.ray_backend import RayBackend

    # Actor 0 is home to clients 0-4, actor 1 to client 5 alone: actor 1 runs out of work first.
    keys = {"fed.method": "rcsr", "partition.alpha": 0.1, "partition.missing_rate": 0.5,
            "fed.participation": 1.0, "runtime.clients_per_actor": 5}
    cfg = small_config(**keys)
    fed = build_federation(cfg)
    assert not make_strategy(cfg, 6, fed.partition.num_clusters, fed.store.dim).client_settings(1).keeps_client_state
    assert make_strategy(small_config(**keys, **{"rcsr.personal": True}), 6, fed.partition.num_clusters,
                         fed.store.dim).client_settings(1).keeps_client_state
    params = {}
    backends = {"local": LocalBackend(fed, cfg), "ray": RayBackend(fed, cfg)}
    if not shared:
        backends["ray"].node = "another-node"
    trained = 0
    try:
        for name, backend in backends.items():
            strategy = make_strategy(cfg, 6, fed.partition.num_clusters, fed.store.dim)
            p = initial_params(fed.store.dim, cfg.model.adapter.bottleneck, 0.0, cfg.seed)
            for r in range(1, cfg.fed.rounds + 1):
                updates, failed = backend.train(strategy.broadcast(r, p), strategy.sample(r, 6),
                                                strategy.client_settings(r), cfg.seed, r)
                assert failed == [] and len(updates) == 6
                trained += name == "ray" and sum(u.delta is not None for u in updates)
                p, _ = strategy.aggregate(r, p, updates)
            params[name] = p
        assert backends["ray"].guest_updates > 0
        # The rounds' last clients went to whichever actor was free, where actors can claim them.
        assert (backends["ray"].pool_updates > 0) == shared
        assert trained > 0 and backends["ray"].shared_updates == (trained if shared else 0)
        # RCSR's prototypes came through the matrix too, from every client (trained or not).
        assert backends["ray"].shared_prototypes == (6 * cfg.fed.rounds if shared else 0)
        # On the driver's machine the round rides in each actor's first chunk, params in shared memory.
        assert backends["ray"].rounds_put == (0 if shared else cfg.fed.rounds)
        # And so do the global prototypes, in row 0 after the params.
        assert backends["ray"].state_in_row == (cfg.fed.rounds if shared else 0)
    finally:
        backends["ray"].shutdown()
    assert torch.equal(params["local"], params["ray"])

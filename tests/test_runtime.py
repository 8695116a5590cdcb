"""Runtime: dropped clients, retried rounds, resume from a checkpoint, actor names, killed actors."""
import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from rcsr_ray.runtime import checkpoint
from rcsr_ray.runtime.folder import LOCK, FolderLock, RunFolderError
from rcsr_ray.runtime.loop import StopAfter, run_simulation
from tests.conftest import descendants, is_loopback, listening_sockets

ALL = {"fed.participation": 1.0}


def _drop_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_failing_client_is_dropped_and_counted(small_config):
    clean = run_simulation(small_config(**ALL), progress=False)
    faulty = run_simulation(small_config(**ALL, **{"runtime.faults": "raise@2:3,raise@3:0"}), progress=False)
    s = faulty.summary
    assert s["dropped_client_rounds"] == 2 and s["completed_client_rounds"] == 3 * 6 - 2
    assert clean.summary["dropped_client_rounds"] == 0
    assert [r.get("dropped_clients") for r in faulty.metrics[1:]] == [0, 1, 1]
    assert not torch.equal(clean.params, faulty.params) and torch.isfinite(faulty.params).all()


def test_round_where_every_client_failed_is_retried_not_aggregated(small_config):
    clean = run_simulation(small_config(**ALL), progress=False)
    every = ",".join(f"raise@2:{c}" for c in range(6))
    retried = run_simulation(small_config(**ALL, **{"runtime.faults": every}), progress=False)
    # The failed attempt left no trace: the retry reproduces the clean round exactly.
    assert torch.equal(clean.params, retried.params)
    assert retried.summary["dropped_client_rounds"] == 6
    assert retried.summary["completed_client_rounds"] == clean.summary["completed_client_rounds"]


@pytest.mark.parametrize("method", ["rcsr", "fedper", "moon"])
def test_resume_is_bit_identical(small_config, tmp_path, method):
    over = {**ALL, "fed.method": method, "fed.rounds": 4, "runtime.checkpoint_every": 3,
            "rcsr.personal": True, "partition.missing_rate": 0.5, "rcsr.router_hidden": 32}
    whole = run_simulation(small_config(**over), tmp_path / "whole", progress=False)
    with pytest.raises(StopAfter):
        run_simulation(small_config(**over), tmp_path / "cut", progress=False, stop_after=2)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    cut_s = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["seconds"]
    resumed = run_simulation(small_config(**over), tmp_path / "cut", progress=False)
    assert torch.equal(whole.params, resumed.params)
    assert _drop_seconds(whole.metrics) == _drop_seconds(resumed.metrics)
    # Wall seconds go on from the interrupted run's: rounds 3 and 4 come after rounds 1 and 2.
    seconds = [r["seconds"] for r in resumed.metrics]
    assert seconds == sorted(seconds) and resumed.summary["seconds"] > cut_s > 0
    assert whole.clients.equals(resumed.clients)  # personal adapters came back too


def test_folder_of_another_config_is_refused_and_left_as_it_was(small_config, tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(StopAfter):
        run_simulation(small_config(), folder, progress=False, stop_after=2)
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    assert "config.yaml" in before  # written first: the folder says how to continue it
    with pytest.raises(RunFolderError, match=r"train.lr: 0.001 -> 0.005\); continue it with "
                                             r"`rcsr-ray run --config \S+config.yaml --out "):
        run_simulation(small_config(**{"train.lr": 5e-3}), folder, progress=False)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    # Keys free to change on resume (the backend, faults, ...) do not count as another config.
    resumed = run_simulation(small_config(**{"runtime.faults": "raise@9:0"}), folder, progress=False)
    assert torch.equal(resumed.params, run_simulation(small_config(), progress=False).params)
    with pytest.raises(RunFolderError, match="a file, not a folder"):
        run_simulation(small_config(), folder / "summary.json", progress=False)


def test_a_folder_another_run_is_writing_is_refused_until_that_run_ends(small_config, tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from rcsr_ray.runtime.folder import FolderLock\n"
                               "FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
                               str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=rf"--out {folder}: another run \(pid {holder.pid}\) is writing "
                                                 r"to it; wait until it ends, or choose another --out"):
            run_simulation(small_config(), folder, progress=False)
        assert [f.name for f in folder.iterdir()] == [LOCK]  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean release: the kernel drops the lock with the process
        holder.wait()
    assert (folder / LOCK).exists()
    held = []

    def during(r):  # the run holds the lock while it writes the folder
        held.append(FolderLock(folder).holder())
        with pytest.raises(RunFolderError, match=rf"another run \(pid {os.getpid()}\)"):
            FolderLock(folder).acquire()
    done = run_simulation(small_config(), folder, progress=False, on_progress=during)
    assert held == [str(os.getpid())] * 3
    assert torch.equal(done.params, run_simulation(small_config(), progress=False).params)
    assert not (folder / LOCK).exists() and (folder / "summary.json").exists()
    # In one process too (flock locks an open file, not a process), and a made folder goes on release.
    with FolderLock(tmp_path / "new"):
        with pytest.raises(RunFolderError, match=rf"another run \(pid {os.getpid()}\)"):
            FolderLock(tmp_path / "new").acquire()
    assert not (tmp_path / "new").exists()


def test_a_run_started_during_another_runs_setup_is_refused(small_config, tmp_path, monkeypatch):
    """The lock is taken before the folder is checked and held through setup: a run of another config
    started meanwhile cannot finish there and leave this one to overwrite it (or be overwritten)."""
    import rcsr_ray.runtime.loop as loop

    folder, real_open = tmp_path / "run", loop.open_store
    refused = []

    def open_store(cfg):
        if cfg.train.lr == 1e-3 and not refused:  # this run's setup: another config tries to run there
            with pytest.raises(RunFolderError, match=rf"another run \(pid {os.getpid()}\) is writing to it"):
                run_simulation(small_config(**{"train.lr": 5e-3}), folder, progress=False)
            refused.append(sorted(f.name for f in folder.iterdir()))
        return real_open(cfg)
    monkeypatch.setattr(loop, "open_store", open_store)
    done = run_simulation(small_config(), folder, progress=False)
    assert refused == [[LOCK]]  # the other run wrote nothing
    assert torch.equal(torch.load(folder / "final.pt")["params"], done.params)
    assert not (folder / LOCK).exists()


def test_a_finished_run_can_be_extended_not_cut(small_config, tmp_path):
    over = {**ALL, "fed.method": "rcsr", "partition.missing_rate": 0.5, "eval.every": 2}
    whole = run_simulation(small_config(**over, **{"fed.rounds": 5}), progress=False)
    run_simulation(small_config(**over), tmp_path / "run", progress=False)  # 3 rounds, evaluated at 2 and 3
    longer = run_simulation(small_config(**over, **{"fed.rounds": 5}), tmp_path / "run", progress=False)
    assert torch.equal(longer.params, whole.params) and longer.summary["mean_r1"] == whole.summary["mean_r1"]
    # The same rows as the 5-round run, plus the first run's last round (3), kept.
    assert [r["round"] for r in longer.metrics] == [0, 2, 3, 4, 5]
    assert _drop_seconds([r for r in longer.metrics if r["round"] != 3]) == _drop_seconds(whole.metrics)
    with pytest.raises(RunFolderError, match=r"fed.rounds: 5 -> 4, fewer: a run can be extended, not cut"):
        run_simulation(small_config(**over, **{"fed.rounds": 4}), tmp_path / "run", progress=False)


@pytest.mark.parametrize("bumped", [False, True])
def test_checkpoint_of_another_layout_is_not_resumed(small_config, tmp_path, monkeypatch, caplog, bumped):
    with pytest.raises(StopAfter):
        run_simulation(small_config(**ALL), tmp_path / "run", progress=False, stop_after=2)
    if bumped:  # as after a change of what a checkpoint holds
        monkeypatch.setattr(checkpoint, "FORMAT", checkpoint.FORMAT + 1)
    with caplog.at_level("WARNING", logger="rcsr_ray.runtime"):
        again = run_simulation(small_config(**ALL), tmp_path / "run", progress=False)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert ("starting afresh" in said) == bumped and ("resuming" in said) != bumped
    assert torch.equal(again.params, run_simulation(small_config(**ALL), progress=False).params)


def test_keys_that_do_not_change_results_may_change_on_resume(small_config, tmp_path, caplog):
    over = {**ALL, "fed.rounds": 4}
    whole = run_simulation(small_config(**over), tmp_path / "whole", progress=False)
    with pytest.raises(StopAfter):
        run_simulation(small_config(**over), tmp_path / "cut", progress=False, stop_after=2)
    free = {"runtime.checkpoint_every": 1, "runtime.round_retries": 3, "runtime.max_restarts": 0,
            "runtime.driver_cpus": 0.5, "data.cache_dir": str(small_config().data.cache_dir) + "/."}
    with caplog.at_level("WARNING", logger="rcsr_ray.runtime"):
        resumed = run_simulation(small_config(**over, **free), tmp_path / "cut", progress=False)
    assert "resuming" in caplog.text and torch.equal(whole.params, resumed.params)


def _federation_and_strategy(cfg):
    from rcsr_ray.data.federation import build_federation
    from rcsr_ray.fl.strategy import make_strategy

    fed = build_federation(cfg)
    return fed, make_strategy(cfg, fed.num_clients, fed.partition.num_clusters, fed.store.dim)


@contextlib.contextmanager
def _ray_backend(small_config, **keys):
    """A Ray backend over the small federation, 3 clients per actor, with round 1's state and client
    settings (for all 6 clients) and the seed; shut down after."""
    from rcsr_ray.models.adapters import initial_params
    from rcsr_ray.runtime.ray_backend import RayBackend

    cfg = small_config(**ALL, **{"runtime.backend": "ray", "runtime.clients_per_actor": 3, **keys})
    fed, strategy = _federation_and_strategy(cfg)
    backend = RayBackend(fed, cfg)
    try:
        params = initial_params(fed.store.dim, cfg.model.adapter.bottleneck, 0.0, cfg.seed)
        yield backend, strategy.broadcast(1, params), strategy.client_settings(1), cfg.seed
    finally:
        backend.shutdown()


def _started_first_on_actor_0(small_config) -> int:
    """The client that actor 0 (clients 0-2) starts round 1 with in `_ray_backend`: its largest, in
    the first chunk sent. Never left for the tail pool, where the other actor could claim it first."""
    from rcsr_ray.runtime.schedule import RoundSchedule

    fed, strategy = _federation_and_strategy(small_config(**ALL))
    work = strategy.client_settings(1).update_cost(*fed.client_profile())
    return RoundSchedule({0: [0, 1, 2], 1: [3, 4, 5]}, work, 2, steal=True).next_chunk(0)[0]


def test_ray_actor_killed_mid_round_timeout_and_names(small_config, ray_session):
    import ray
    from ray.util.state import list_actors

    hangs = _started_first_on_actor_0(small_config)
    with _ray_backend(small_config, **{"runtime.faults": f"hang@1:{hangs},hang@2:4"}) \
            as (backend, state, settings, seed):
        backend.client_state()  # the actors are up
        deadline, names = time.monotonic() + 30, set()
        while not {"rcsr-clients-0-2", "rcsr-clients-3-5"} <= names and time.monotonic() < deadline:
            names = {a.name for a in list_actors(address=ray_session.address, filters=[("state", "=", "ALIVE")])}
            time.sleep(0.5)
        assert {"rcsr-clients-0-2", "rcsr-clients-3-5"} <= names

        # Round 1: the actor holding clients 0-2 is killed mid-round, while the first client it
        # started hangs on it; the clients it was running are dropped, and the other actor takes
        # over those it had not started (FedAvg keeps no client state), so the round completes with
        # everyone else.
        killer = threading.Timer(3.0, lambda: ray.kill(backend.actors[0], no_restart=False))
        killer.start()
        backend.timeout = 60  # bounds the test should the hanging client ever run elsewhere
        updates, failed = backend.train(state, range(6), settings, seed, 1)
        killer.join()
        assert hangs in failed and set(failed) <= {0, 1, 2}
        assert sorted(failed + [u.client_id for u in updates]) == list(range(6))
        # Round 2: client 4 hangs past the round timeout; its actor is killed and restarted, and
        # the clients it held (its own, or others' it had taken over and queued) are dropped.
        backend.timeout = 15
        updates, failed = backend.train(state, range(6), settings, seed, 2)
        assert 4 in failed and len(updates) >= 2
        assert sorted(failed + [u.client_id for u in updates]) == list(range(6))
        # Round 3: both restarted actors serve again.
        updates, failed = backend.train(state, range(6), settings, seed, 3)
        assert failed == [] and len(updates) == 6


def test_ray_and_its_actors_listen_on_loopback_only(small_config, ray_session):
    """Ray as the tests start it, as `rcsr-ray run` does (connect.start_local_ray): its daemons, the
    dashboard, the metrics endpoint and the client actors accept connections on 127.0.0.1 only,
    never on the machine's outward address."""
    with socket.create_server(("0.0.0.0", 0)) as everywhere:  # what the check must catch
        assert (ipaddress.ip_address("0.0.0.0"), everywhere.getsockname()[1]) in listening_sockets([os.getpid()])
    assert not is_loopback(ipaddress.ip_address("0.0.0.0"))
    with _ray_backend(small_config) as (backend, state, settings, seed):
        updates, _ = backend.train(state, range(6), settings, seed, 1)
        sockets = listening_sockets(descendants(os.getpid()))
    assert len(updates) == 6
    assert [s for s in sockets if not is_loopback(s[0])] == []
    host, gcs = ray_session.address.rsplit(":", 1)
    ports = {port for _, port in sockets}
    assert host == "127.0.0.1" and {int(gcs), ray_session.metrics_port} <= ports
    assert len(sockets) >= 8, sockets  # GCS, raylet (2), dashboard, its agent, the actors, ...


def _cannot_claim(actor) -> None:
    """A ClientActor that never opens the tail pool (as one whose /dev/shm is another than the driver's)."""
    actor.pool = None
    actor._open_pool = lambda spec: None


def test_round_tail_goes_to_whoever_is_free_or_out_as_chunks(small_config, ray_session):
    """The round's last clients are claimed from the tail pool by the actors; where no actor can
    claim them, they go out as chunks once nothing is pending, and the round still completes."""
    import ray

    with _ray_backend(small_config) as (backend, state, settings, seed):
        updates, failed = backend.train(state, range(6), settings, seed, 1)
        assert failed == [] and [u.client_id for u in updates] == list(range(6))
        assert 0 < backend.pool_updates <= 4  # at most 2 per actor were left for the pool
        claimed = backend.pool_updates
        ray.get([a.__ray_call__.remote(_cannot_claim) for a in backend.actors])
        updates, failed = backend.train(state, range(6), settings, seed, 2)
        assert failed == [] and [u.client_id for u in updates] == list(range(6))
        assert backend.pool_updates == claimed  # nobody claimed: all ran as chunks


def _wait_for(actor, probe, what: str, dead: bool = False, limit_s: float = 60.0) -> None:
    """Poll `actor` with `probe` (run inside it) until it returns true, or, with `dead`, until the
    actor is gone for good; fails the test after `limit_s`."""
    import ray

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if ray.get(actor.__ray_call__.remote(probe), timeout=5):
                return
        except ray.exceptions.ActorDiedError:
            if dead:
                return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # dying or restarting
        time.sleep(0.1)
    raise AssertionError(f"waited {limit_s:.0f} s for {what}")


def test_actor_gone_for_good_gets_no_more_clients(small_config, ray_session):
    """An actor past runtime.max_restarts is left out of later rounds; with updates that keep no
    client state, the other actor runs its clients too."""
    import ray

    with _ray_backend(small_config, **{"runtime.max_restarts": 0}) as (backend, state, settings, seed):
        ray.kill(backend.actors[0], no_restart=True)
        # ray.kill returns before the actor is dead: a call sent meanwhile could still be answered
        _wait_for(backend.actors[0], lambda a: False, "the killed actor to die", dead=True)
        backend.restarting.add(0)  # as after a failed round
        updates, failed = backend.train(state, range(6), settings, seed, 1)
        assert backend.gone == {0}
        assert failed == [] and [u.client_id for u in updates] == list(range(6))
        assert backend.guest_updates == 3  # clients 0-2, away from their home actor

        def reads_and_guests():
            return ray.get(backend.actors[1].__ray_call__.remote(
                lambda a: (a.worker.shard_reads, sorted(a.guests), sum(a.guests.values()))))
        reads, kept, _ = reads_and_guests()
        assert reads == 6 and kept == [0, 1, 2]
        backend.train(state, range(6), settings, seed, 2)
        assert reads_and_guests()[:2] == (6, [0, 1, 2])  # the guests' data was kept, not read again
        # A budget that holds one guest's data: the least recently run ones are dropped.
        sizes = ray.get(backend.actors[1].__ray_call__.remote(
            lambda a: {c: a.worker.shards[c].nbytes for c in a.guests}))
        budget = max(sizes.values())
        ray.get(backend.actors[1].__ray_call__.remote(lambda a: setattr(a, "guest_bytes", budget)))
        backend.train(state, range(6), settings, seed, 3)
        reads, kept, held = reads_and_guests()
        # Dropped at the end of each task (the first may run home clients only): each guest is read
        # again at most once, unless it is the one kept when it runs.
        assert 6 <= reads <= 9 and len(kept) == 1 and held == sizes[kept[0]] <= budget
        ray.get(backend.actors[1].__ray_call__.remote(lambda a: setattr(a, "guest_bytes", 0)))
        backend.train(state, range(6), settings, seed, 4)
        reads, kept, held = reads_and_guests()
        assert kept == [] and held == 0
        backend.train(state, range(6), settings, seed, 5)
        assert reads_and_guests() == (reads + 3, [], 0)  # nothing kept: every guest read again


def _as_restarted(actor) -> None:
    """What a restart leaves of a ClientActor: no round, no clients, no shared matrix."""
    actor.round, actor.worker = None, None
    actor.writer.close()


class _ForgetsItsRound:
    """An actor handle whose actor is emptied as by a restart just before every chunk sent without
    the round, as an actor that Ray restarted, unseen, between two chunks of one call."""

    def __init__(self, actor, delay_s: float = 0.0):
        self.actor, self.forgotten, self.delay_s = actor, 0, delay_s
        self.train = self  # `.train.remote(...)` lands in `remote` below

    def __getattr__(self, name):
        return getattr(self.actor, name)

    def remote(self, call, chunk, round_args=None):
        import ray

        if round_args is None:
            ray.get(self.actor.__ray_call__.remote(_as_restarted))
            self.forgotten += 1
        ref = self.actor.train.remote(call, chunk, round_args)
        time.sleep(self.delay_s if round_args is None else 0.0)  # holds the driver: its answer waits
        return ref


def test_actor_that_lost_its_round_mid_call_gets_its_chunk_again(small_config, ray_session):
    """A chunk reaching an actor without the call's round (Ray restarted it since the call's first
    chunk, and no task failed) comes back as None; the driver sends it again with the round, and the
    round loses nobody."""
    with _ray_backend(small_config, **{"runtime.clients_per_actor": 6}) as (backend, state, settings, seed):
        first, failed = backend.train(state, range(6), settings, seed, 1)
        assert failed == [] and backend.resent_chunks == 0
        forgetful = backend.actors[0] = _ForgetsItsRound(backend.actors[0])
        try:
            again, failed = backend.train(state, range(6), settings, seed, 1)
        finally:
            backend.actors[0] = forgetful.actor  # the real handle, for shutdown
        assert forgetful.forgotten >= 1 and backend.resent_chunks == forgetful.forgotten
        assert failed == [] and [u.client_id for u in again] == list(range(6))
        # the resent chunks' deltas too came through the shared matrix (reopened after the "restart")
        assert backend.shared_updates == sum(u.delta is not None for u in first + again) > 0
        assert all(torch.equal(a.delta, b.delta) for a, b in zip(first, again) if a.delta is not None)


def test_chunk_without_its_round_past_the_deadline_is_not_sent_again(small_config, ray_session):
    """Past the round's timeout, a chunk answered with "no round" is counted as timed out, not sent
    again; the actor is not killed (it did nothing wrong) and serves the next round in full."""
    with _ray_backend(small_config, **{"runtime.clients_per_actor": 6, "runtime.round_timeout_s": 2.0}) \
            as (backend, state, settings, seed):
        backend.train(state, range(6), settings, seed, 1)  # the actor up and its shards read
        forgetful = backend.actors[0] = _ForgetsItsRound(backend.actors[0], delay_s=2.5)
        try:
            updates, failed = backend.train(state, range(6), settings, seed, 1)
        finally:
            backend.actors[0] = forgetful.actor
        assert forgetful.forgotten == 1 and backend.resent_chunks == 0
        assert failed and sorted([u.client_id for u in updates] + failed) == list(range(6))
        assert backend.restarting == set()  # not killed
        again, failed = backend.train(state, range(6), settings, seed, 1)
        assert failed == [] and [u.client_id for u in again] == list(range(6))


def _cannot_open_shared_memory(actor) -> None:
    """A ClientActor on the driver's machine that cannot open the shared matrix (a container with a
    /dev/shm of its own, say)."""
    actor.writer.close()
    actor.writer.open = lambda path, shape: None


def test_actor_that_cannot_open_the_shared_matrix_gets_full_rounds(small_config, ray_session):
    """Sent a light round it cannot use, an actor says so; its chunk goes again with the full round,
    and from then on it gets full rounds directly and sends its deltas back as results."""
    import ray

    with _ray_backend(small_config) as (backend, state, settings, seed):
        ray.get(backend.actors[0].__ray_call__.remote(_cannot_open_shared_memory))
        first, failed = backend.train(state, range(6), settings, seed, 1)
        assert failed == [] and [u.client_id for u in first] == list(range(6))
        assert backend.nodes[0] is None and backend.nodes[1] == backend.node
        assert backend.resent_chunks >= 1 and backend.rounds_put == 1
        resent, shared = backend.resent_chunks, backend.shared_updates
        again, failed = backend.train(state, range(6), settings, seed, 1)
        assert failed == [] and backend.resent_chunks == resent and backend.rounds_put == 2
        trained = sum(u.delta is not None for u in again)
        assert 0 < backend.shared_updates - shared < trained  # actor 1's through the matrix, actor 0's not
        assert all(torch.equal(a.delta, b.delta) for a, b in zip(first, again) if a.delta is not None)


def test_actor_restarted_between_rounds_attaches_again(small_config, ray_session):
    """An actor killed while idle (the backend sees no failure) comes back empty from Ray's
    restart; it attaches its clients again on its next call, and the round loses nobody."""
    import ray

    with _ray_backend(small_config) as (backend, state, settings, seed):
        first, failed = backend.train(state, range(6), settings, seed, 1)
        assert failed == []
        actor = backend.actors[0]
        ray.kill(actor, no_restart=False)
        _wait_for(actor, lambda a: ray.get_runtime_context().was_current_actor_reconstructed,
                  "the killed actor to be restarted")
        again, failed = backend.train(state, range(6), settings, seed, 1)
        assert failed == [] and [u.client_id for u in again] == list(range(6))
        # Its light round (no clients attached to serve it) came back; it got the full one, put once.
        assert backend.resent_chunks >= 1 and backend.rounds_put == 1
        # Same round, same state: the restarted actor computes the same updates.
        assert all(torch.equal(a.delta, b.delta) for a, b in zip(first, again) if a.delta is not None)
        local = backend.evaluate_local(state.params, range(6))  # clients 0-2 are evaluated on the restarted actor
        assert len(local) == 6 and all(0 <= m["global_i2t_r1"] <= 100 for m in local)


def _unavailable(actor) -> None:
    import ray

    raise ray.exceptions.ActorUnavailableError("unreachable for a moment (test)", None)


class _GoesUnavailable:
    """Stands in for the backend's handle of actor `index` for a call's first two chunks: the first
    fails as when the actor cannot be reached for a moment (it may still be alive, and run what is
    queued behind it), the second goes to the actor; then the real handle is back in place (the
    backend kills the actor through it). Records the chunks sent."""

    def __init__(self, backend, index: int):
        self.backend, self.index, self.actor, self.chunks = backend, index, backend.actors[index], []
        self.train = self  # `.train.remote(...)` lands in `remote` below

    def remote(self, call, chunk, round_args=None):
        self.chunks.append(chunk)
        if len(self.chunks) == 1:
            return self.actor.__ray_call__.remote(_unavailable)
        self.backend.actors[self.index] = self.actor
        return self.actor.train.remote(call, chunk, round_args)


def test_unavailable_actor_is_killed_and_its_queued_chunks_dropped(small_config, ray_session):
    """An actor that cannot be reached may still run the chunks queued on it: they are dropped with
    the failed one, not handed to another actor that would write the same rows; the actor is killed,
    restarted by Ray, and serves the next round in full."""
    import ray

    # 12 paired clients of one size: actor 0 gets a chunk and one queued behind it before any result.
    keys = {"partition.num_clients": 12, "partition.alpha": None, "partition.missing_rate": 0.0,
            "runtime.clients_per_actor": 6}
    with _ray_backend(small_config, **keys) as (backend, state, settings, seed):
        flaky = backend.actors[0] = _GoesUnavailable(backend, 0)
        try:
            updates, failed = backend.train(state, range(12), settings, seed, 1)
        finally:
            backend.actors[0] = flaky.actor
        sent = sorted(c for chunk in flaky.chunks for c in chunk)
        assert len(flaky.chunks) == 2  # the failed chunk and the one queued behind it
        assert failed == sent and set(sent) < set(range(6))
        # Nobody else ran them; the other actor took over the rest of actor 0's clients.
        assert [u.client_id for u in updates] == sorted(set(range(12)) - set(sent))
        assert backend.restarting == {0} and backend.guest_updates == 6 - len(sent)
        _wait_for(flaky.actor, lambda a: ray.get_runtime_context().was_current_actor_reconstructed,
                  "the killed actor to be restarted")
        again, failed = backend.train(state, range(12), settings, seed, 2)
        assert failed == [] and [u.client_id for u in again] == list(range(12))

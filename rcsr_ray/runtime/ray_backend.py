"""The Ray backend: client actors that run the same client update as the local backend.

Clients are assigned to actors in contiguous blocks (their home); an actor reads its clients' rows
from the feature store (memmaps, shared through the page cache) once and keeps them, with their
private state. A round's clients are handed out a chunk at a time (`schedule.RoundSchedule`); when
its updates keep no client state and shards are cheap to read (not in blocks mode, which decodes
images), an actor done with its own clients takes over some of another's, as a guest: it reads
their data for that update and keeps the latest guests' data up to `GUEST_BYTES`.

What crosses Ray per round: the round (global adapters, settings, seed) with each actor's first
chunk; then per chunk a list of client ids out and the updates back. On the driver's machine the
driver writes the global adapters into a shared-memory matrix (`shared_rows`), the first chunk
carries the rest of the round in its task, and each actor writes its clients' deltas (and RCSR's
prototypes: `RowLayout`) into rows of that matrix as it computes them and returns only the rest of
the updates. Elsewhere the round goes through the object store once (`ray.put`) and the updates
come back whole as results. Each chunk's updates
are read while the actor runs its next chunk.

When updates keep no client state, a round's last clients (`TAIL_PER_ACTOR` per actor) are not
handed out by the driver but put in a `TailPool` in shared memory, from which actors on the
driver's machine claim them one at a time whenever they have no chunk queued: whoever is free takes
the next one at once, without a round trip to the driver. An actor that fails loses what it claimed
and had not returned, as it loses its running chunk; what nobody claimed goes out as chunks.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import ray
import torch

from rcsr_ray.config import Config, parse_faults
from rcsr_ray.fl.client import ClientSettings, ClientUpdate, ClientWorker, GlobalState, RowLayout
from rcsr_ray.runtime.connect import ensure_ray
from rcsr_ray.runtime.faults import ClientFailure, run_clients, split_results
from rcsr_ray.runtime.schedule import RoundSchedule
from rcsr_ray.runtime.shared_rows import SHM_DIR, RowWriter, SharedRows, TailPool

log = logging.getLogger(__name__)

# What an actor answers a chunk it cannot run with the round it has; the driver sends the chunk again
# with the full round.
NO_ROUND = "no round"  # restarted by Ray since the call's round reached it: no round, or no clients attached
NO_MATRIX = "no shared matrix"  # got a light round but cannot open the shared matrix here
# The round's last clients, this many per actor that can claim them (or fewer), go to the tail pool
# (`TailPool`): about the uneven finish measured with chunks alone (17-28 ms, a client or two).
TAIL_PER_ACTOR = 2
# A light round whose prototypes are larger than this, and do not fit in row 0 of the shared matrix
# beside the params, is put in the object store once, not sent inline with every actor's first
# chunk (Ray puts an argument over 100 KB per call by itself).
INLINE_BYTES = 64 * 1024
# Guests' data an actor keeps after their updates, the least recently run dropped first: the same
# clients tend to be taken over round after round (the smallest, the last by id), and reading one
# again cost 2.3 ms (peer workload) to 4.9 ms (S4: shifted, renormalised) against an 11-17 ms update.
GUEST_BYTES = 64 * 2**20


def actor_device() -> str:
    """The torch device of the calling actor: what Ray assigned it, a GPU share when it asked for one."""
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


@dataclass
class RoundArgs:
    """One call of `RayBackend.train`, as its actors need it. In full it is put in the object store
    once per call. Actors on the driver's machine get it light instead: no params (they are in row 0
    of the shared matrix) and no federation ref, inside their first chunk's task (an object-store
    round trip cost more than a tenth of a packed round's start on 2 cores), or put once when its
    prototypes make it large (RCSR with many clusters)."""

    call: int  # tags the call's chunks, so that an actor never runs one with another call's state
    state: GlobalState  # light: its params are None
    settings: ClientSettings
    seed: int
    round_idx: int
    attempt: int
    rows: dict[int, int]  # client -> its row in the shared matrix (row 0 holds the params)
    shared: tuple | None  # (path, shape, node id, params' length) of that matrix; None: deltas come back as results
    federation: list | None  # [its object-store ref], for an actor that Ray restarted since; light: None
    pool: tuple | None = None  # the call's TailPool (its `spec`); None: no pool
    state_row: tuple | None = None  # light: where the broadcast's prototypes sit in row 0 (`_state_into_row`)

    def light(self, state_row: tuple | None) -> "RoundArgs":
        protos = None if state_row else self.state.prototypes
        return replace(self, state=replace(self.state, params=None, prototypes=protos), federation=None,
                       state_row=state_row)


@ray.remote
class ClientActor:
    """Serves a block of clients. Their data does not come through the constructor: Ray cannot
    promise to restart an actor whose constructor arguments live in the object store. Instead every
    call that needs the clients carries the federation's ref (wrapped in a list so that Ray passes
    it as is), and the actor attaches on its first such call, and again after Ray restarted it."""

    def __init__(self, bottleneck: int, torch_threads: int, faults: str, home: range, index: int):
        torch.set_num_threads(torch_threads)
        self.bottleneck, self.torch_threads = bottleneck, torch_threads
        self.faults = parse_faults(faults)
        self.home = home  # the clients whose data and state this actor keeps
        self.index = index  # its place among the backend's actors (its name in the tail pool)
        self.round: RoundArgs | None = None
        self.writer = RowWriter()  # the driver's shared delta matrix, when this actor can reach it
        self.pool: TailPool | None = None  # the driver's tail pool, likewise
        self.tasks = [None, 0]  # a call, and how many of its tasks this actor has begun
        self.worker: ClientWorker | None = None
        self.guests: OrderedDict[int, int] = OrderedDict()  # guests whose data it keeps -> bytes, oldest first
        self.guest_bytes = GUEST_BYTES

    def _serve(self, federation: list) -> ClientWorker:
        """The worker, attached first if need be. After Ray restarted this actor (a failure, or a
        kill between rounds that the backend never saw) its clients' private state is lost."""
        if self.worker is None:
            with warnings.catch_warnings():  # Ray's own property reads a deprecated one (actor_id)
                warnings.simplefilter("ignore", DeprecationWarning)
                restarted = ray.get_runtime_context().was_current_actor_reconstructed
            if restarted:
                log.warning("actor for clients %d-%d was restarted: attaching its clients again",
                            self.home.start, self.home.stop - 1)
            self.worker = ClientWorker(ray.get(federation[0]), self.bottleneck, self.torch_threads,
                                       device=actor_device())
            self.guests.clear()
        return self.worker

    def train(self, call: int, clients: list[int], round_args: RoundArgs | None = None):
        """The updates of `clients`, then of whatever this actor claims from the call's tail pool
        while no other task of the call is queued behind this one, and which of their tensors they
        left in the shared matrix, by client (`_leave_in_row`). `round_args` comes with an actor's
        first chunk of a call only. NO_ROUND or NO_MATRIX when this actor needs the full round."""
        if self.tasks[0] != call:
            self.tasks = [call, 0]
        self.tasks[1] += 1  # counted as the driver counts what it sends, whatever happens next
        if round_args is not None:
            self.round = round_args
            shared = round_args.shared
            if shared and shared[2] == ray.get_runtime_context().get_node_id():
                self.writer.open(*shared[:2])
            else:
                self.writer.close()
            self._open_pool(round_args.pool if self.writer.array is not None else None)
            if round_args.state.params is None:
                if self.writer.array is None or (self.worker is None and round_args.federation is None):
                    self.round = None
                    return NO_ROUND if self.writer.array is not None else NO_MATRIX
                # Copies: the driver writes the next call's round there.
                row = self.writer.array[0]
                round_args.state.params = torch.from_numpy(np.array(row[:shared[3]]))
                if round_args.state_row:
                    round_args.state.prototypes = _state_from_row(row[shared[3]:], round_args.state_row)
        r = self.round
        if r is None or r.call != call:
            return NO_ROUND  # restarted by Ray since the call's first chunk
        deltas = self.writer.array
        rows = None if deltas is None else {c: torch.from_numpy(deltas[r.rows[c]]) for c in clients}
        worker = self._serve(r.federation)

        def run(cs: list[int]) -> list:
            return run_clients(worker, cs, r.state, r.settings, r.seed, r.round_idx, r.attempt, self.faults,
                               in_process=False, out=rows.get if rows is not None else None)
        results, ran = run(clients), list(clients)
        pool = self.pool if r.pool is not None and rows is not None else None
        while pool is not None and (c := pool.claim(call, self.index, self.tasks[1])) is not None:
            rows[c] = torch.from_numpy(deltas[r.rows[c]])
            results += run([c])
            ran.append(c)
        self._keep_guests(worker, ran)
        stashed = {}
        for u in results if rows else ():
            if isinstance(u, ClientUpdate) and (fields := _leave_in_row(u, rows[u.client_id])):
                stashed[u.client_id] = fields
        return results, stashed

    def _keep_guests(self, worker: ClientWorker, ran: list[int]) -> None:
        """Keep the data of the guests among the clients just run, dropping the least recently run
        guests beyond `guest_bytes`."""
        for c in ran:
            if c in self.home:
                continue
            self.guests.pop(c, None)
            if c in worker.shards:
                self.guests[c] = worker.shards[c].nbytes
        held = sum(self.guests.values())
        while held > self.guest_bytes:
            c, size = self.guests.popitem(last=False)
            worker.forget(c)
            held -= size

    def _open_pool(self, spec: tuple | None) -> None:
        """The tail pool at `spec` (`TailPool.spec`), kept while the driver keeps it."""
        if spec is None or (self.pool is not None and self.pool.spec == spec):
            return
        if self.pool is not None:
            self.pool.release()
        try:
            self.pool = TailPool(spec[1], spec[2], path=spec[0])
        except (OSError, ValueError):
            self.pool = None

    def ping(self, federation: list) -> str:
        """Answers, with its node's id, once the actor is up with its clients attached (after a restart too)."""
        self._serve(federation)
        return ray.get_runtime_context().get_node_id()

    def client_state(self, clients: list[int], federation: list) -> dict[int, dict]:
        worker = self._serve(federation)
        return {c: worker.state[c] for c in clients if c in worker.state}

    def load_client_state(self, states: dict[int, dict], federation: list) -> None:
        worker = self._serve(federation)
        for c, s in states.items():
            worker.shard(c)
            worker.state[c] = s

    def evaluate_local(self, params: torch.Tensor, clients: list[int], federation: list) -> list[dict]:
        worker = self._serve(federation)
        return [worker.evaluate_local(c, params) for c in clients]


def _state_into_row(tail: np.ndarray, tensors: dict[str, torch.Tensor] | None) -> tuple | None:
    """Write the broadcast's prototypes (float32 and bool tensors) one after another into `tail`,
    row 0 of the shared matrix after the params, and return where they are: (name, shape, is bool)
    each. None, writing nothing, when there are none or they do not fit (a client row holds as many
    per-cluster values as the broadcast when the clients report prototypes, RCSR's case)."""
    if not tensors or any(t.dtype not in (torch.float32, torch.bool) for t in tensors.values()) \
            or sum(t.numel() for t in tensors.values()) > len(tail):
        return None
    where, offset = [], 0
    for name, t in tensors.items():
        tail[offset:offset + t.numel()] = t.detach().cpu().reshape(-1).numpy()  # bool: 0.0 or 1.0, exact
        where.append((name, tuple(t.shape), t.dtype == torch.bool))
        offset += t.numel()
    return tuple(where)


def _state_from_row(tail: np.ndarray, where: tuple) -> dict[str, torch.Tensor]:
    """Copies of the tensors `_state_into_row` wrote into `tail`."""
    tensors, offset = {}, 0
    for name, shape, is_bool in where:
        n = math.prod(shape)
        t = torch.from_numpy(np.array(tail[offset:offset + n])).view(shape)
        tensors[name] = t != 0 if is_bool else t
        offset += n
    return tensors


def _leave_in_row(update: ClientUpdate, row: torch.Tensor) -> tuple[str, ...]:
    """Which of the update's tensors were written into `row` of the shared matrix (its delta, its
    prototypes): they are taken off the update, which travels without them, and the driver reads
    them from the row."""
    base = row.untyped_storage().data_ptr()

    def in_row(t: torch.Tensor | None) -> bool:
        return t is not None and t.untyped_storage().data_ptr() == base

    fields = ()
    if in_row(update.delta):
        update.delta, fields = None, ("delta",)
    if update.prototypes and all(in_row(t) for t in update.prototypes.values()):
        fields += tuple(update.prototypes)
        update.prototypes = None
    return fields


def _take_from_row(update: ClientUpdate, fields: tuple[str, ...], shared: SharedRows, row: int,
                   layout: RowLayout) -> None:
    """Put back into `update` private copies of the tensors its actor left in row `row` of the shared
    matrix (the row is written again next call). The delta and the prototypes are copied apart: a
    strategy may keep the delta (RCSR's update history) without the rest of the row."""
    if "delta" in fields:
        update.delta = torch.from_numpy(shared.row(row, 0, layout.params))
    names = [f for f in fields if f != "delta"]
    if names:
        protos = layout.prototypes(torch.from_numpy(shared.row(row, layout.params, layout.width)))
        update.prototypes = {name: protos[name] for name in names}


def plan_actors(num_clients: int, cluster_cpus: float, client_cpus: float, clients_per_actor: int | None,
                cluster_gpus: float = 0.0, client_gpus: float = 0.0) -> int:
    """Clients per actor: as asked, else one per actor while the cluster's CPUs (and GPUs, when
    actors take a GPU share) allow, else packed."""
    if clients_per_actor:
        return min(clients_per_actor, num_clients)
    slots = max(1, int(cluster_cpus // client_cpus))
    if client_gpus > 0:
        slots = min(slots, max(1, int(round(cluster_gpus / client_gpus, 6))))
    return math.ceil(num_clients / min(slots, num_clients))


def client_gpu_share(cfg: Config, cluster_gpus: float) -> float:
    """runtime.client_gpus where the cluster has GPUs, else 0 (the same config runs on a laptop)."""
    return cfg.runtime.client_gpus if cluster_gpus > 0 else 0.0


def gpu_advice(cfg: Config, gpu_share: float) -> str | None:
    """A warning for GPU client actors on cached features, where they were measured slower than CPU ones."""
    if gpu_share and cfg.model.adapter.placement == "head":
        return (f"runtime.client_gpus={gpu_share:g} on cached features (model.adapter.placement=head): these "
                "adapter updates are bound by kernel launches, and GPU client actors ran slower than CPU ones "
                "where measured (README, GPUs); runtime.client_gpus=0 keeps them on CPUs")
    return None


class RayBackend:
    name = "ray"

    def __init__(self, federation, cfg: Config, run_name: str | None = None):
        ensure_ray(cfg)
        # Actor names are unique per namespace: one namespace per run lets runs (e.g. Tune trials)
        # share a cluster while every run's actors keep their plain names.
        namespace = f"rcsr-{run_name or 'run'}-{uuid.uuid4().hex[:8]}"
        rt = cfg.runtime
        n = federation.num_clients
        resources = ray.cluster_resources()
        gpus = client_gpu_share(cfg, resources.get("GPU", 0))
        if advice := gpu_advice(cfg, gpus):
            log.warning(advice)
        self.per_actor = plan_actors(n, resources.get("CPU", 1), rt.client_cpus, rt.clients_per_actor,
                                     resources.get("GPU", 0), gpus)
        # One copy of the federation in the object store, held for the backend's lifetime; the list
        # makes Ray hand actors the ref itself, to attach from on first use and after a restart.
        self.federation_arg = [ray.put(federation)]
        self.client_profile = federation.client_profile()
        self.shards_are_cheap = federation.shards_are_cheap
        self.actors = []
        for first in range(0, n, self.per_actor):
            last = min(first + self.per_actor, n) - 1
            name = f"rcsr-client-{first}" if first == last else f"rcsr-clients-{first}-{last}"
            # A restarted actor comes back empty and reloads its clients' shards on first use.
            options = dict(name=name, namespace=namespace, num_cpus=rt.client_cpus, num_gpus=gpus,
                           max_restarts=rt.max_restarts, max_task_retries=0)
            self.actors.append(ClientActor.options(**options).remote(
                cfg.model.adapter.bottleneck, rt.torch_threads, rt.faults, range(first, last + 1), len(self.actors)))
        self.dim = federation.store.dim  # the prototypes' width
        self.node = ray.get_runtime_context().get_node_id()
        # Each actor's node: those on the driver's get light rounds (None: never, see NO_MATRIX).
        self.nodes: list[str | None] = ray.get([a.ping.remote(self.federation_arg) for a in self.actors])
        self.timeout = rt.round_timeout_s
        self.restarting: set[int] = set()  # actors that failed and are being restarted by Ray
        self.guest_updates = 0  # client updates made away from the client's home actor
        self.gone: set[int] = set()  # actors past runtime.max_restarts: they get no more clients
        self.calls = 0
        self.shared: SharedRows | None = None  # the delta matrix, grown to the largest round
        self.shared_unavailable = False  # no shared memory here (or no room): not tried again
        self.shared_updates = 0  # client updates whose delta came through the shared matrix
        self.shared_prototypes = 0  # and those whose prototypes did
        self.pool: TailPool | None = None  # the round's last clients, claimed by free actors (see TailPool)
        self.pool_updates = 0  # client updates an actor claimed from it
        self.resent_chunks = 0  # chunks sent again with the full round to an actor restarted since it got one
        self.rounds_put = 0  # calls whose round went through the object store (some actor off this machine)
        self.state_in_row = 0  # calls that sent an actor a light round whose prototypes were in row 0

    def train(self, state: GlobalState, clients: np.ndarray, settings: ClientSettings, seed: int,
              round_idx: int, attempt: int = 0) -> tuple[list[ClientUpdate], list[int]]:
        """Updates of the clients that finished in time. The chunk an actor was running when it died
        or ran past the round timeout is dropped from this round (a timed-out actor is killed, so
        that Ray restarts it), with the clients it had claimed from the tail pool in that task; what
        it had not started goes to the other actors when they may take it over (see the module
        docstring), and is dropped otherwise."""
        self._await_restarts()
        self.calls += 1
        rows = {int(c): i + 1 for i, c in enumerate(clients)}
        layout = RowLayout.of(state.params.numel(), settings, self.dim)
        shared = self._shared_matrix(len(rows) + 1, layout.width, state.params)
        schedule = RoundSchedule(dict(self._by_actor(clients)), settings.update_cost(*self.client_profile),
                                 len(self.actors), steal=self.shards_are_cheap and not settings.keeps_client_state)
        for actor in self.gone:
            schedule.close(actor)
        # With any actor free to run any client, the round's last clients go to whoever is free
        # among the actors that can reach the pool (on this machine).
        claimers = [a for a, n in enumerate(self.nodes) if n == self.node and a not in self.gone]
        pool = self._tail_pool(len(rows)) if shared and schedule.steal and claimers else None
        if pool is not None:
            pool.start(self.calls)
        full = RoundArgs(self.calls, state, settings, seed, round_idx, attempt, rows,
                         shared and (shared.path, shared.shape, self.node, layout.params), self.federation_arg,
                         pool and pool.spec)
        light, state_row = None, None
        if shared:
            shared.array[0, :layout.params] = state.params.numpy()
            state_row = _state_into_row(shared.array[0, layout.params:], state.prototypes) \
                if self.node in self.nodes else None  # nobody here to read it otherwise
            light = full.light(state_row)
            protos = light.state.prototypes or {}
            if sum(t.numel() * t.element_size() for t in protos.values()) > INLINE_BYTES:
                light = ray.put(light)
        full_ref, state_row_sent = None, False

        def round_for(actor: int, resend: bool = False):
            """The round as `actor` gets it: light on the driver's machine, else the full one's ref."""
            nonlocal full_ref, state_row_sent
            if light is not None and not resend and self.nodes[actor] == self.node:
                if state_row and not state_row_sent:
                    state_row_sent = True
                    self.state_in_row += 1
                return light
            if full_ref is None:
                full_ref = ray.put(full)
                self.rounds_put += 1
            return full_ref
        pooled: set[int] = set()  # clients put in the pool this call
        claims_nothing: set[int] = set()  # actors whose empty chunk came back without a client
        returned: set[int] = set()  # clients whose update (or failure) is in `results`
        pending: dict = {}  # task -> (actor, its clients)
        started: set[int] = set()  # actors that were sent this call's round
        deadline = None if self.timeout is None else time.monotonic() + self.timeout

        def expired() -> bool:
            return deadline is not None and time.monotonic() >= deadline

        def send(actor: int, chunk: list[int], resend: bool = False) -> None:
            first = actor not in started or resend
            started.add(actor)
            if pool is not None:
                pool.sent_task(actor)  # before it can reach the actor, which compares counts
            ref = self.actors[actor].train.remote(self.calls, chunk, round_for(actor, resend) if first else None)
            pending[ref] = (actor, chunk)

        def fill(actor: int, up_to: int = 2) -> None:
            """Keep up to two chunks queued on `actor`, so that it rarely waits for the driver between
            chunks. Where the schedule holds a round's last clients back for whoever runs out first,
            they go to the tail pool instead, if there is one."""
            while not expired() and schedule.chunks_held[actor] < up_to:
                open_claimers = sum(a not in schedule.closed for a in claimers)
                if pool is not None and not pooled and 0 < schedule.queued() <= TAIL_PER_ACTOR * open_claimers:
                    tail = schedule.drain()
                    pool.fill(tail, [self._home(c) for c in tail])
                    pooled.update(tail)
                    for other in range(len(self.actors)):
                        nudge(other)
                    return
                chunk = schedule.next_chunk(actor)
                if not chunk:
                    return
                send(actor, chunk)

        def reclaim() -> None:
            """With no task pending, clients still in the pool (whoever could claim them failed) go
            out as chunks to the actors left."""
            if pooled and not pending and not expired():
                for c in pool.take_back():
                    schedule.put_back(self._home(c), [c])
                for other in range(len(self.actors)):
                    fill(other)

        def nudge(actor: int) -> None:
            """An actor on this machine with nothing queued gets an empty chunk, after which it claims
            from the pool (while the pool has clients), unless such a chunk came back empty before
            (it cannot claim: it could not open the pool, or Ray restarted it and it lost count)."""
            if (pooled and not expired() and actor not in schedule.closed and schedule.chunks_held[actor] == 0
                    and actor not in claims_nothing and self.nodes[actor] == self.node and pool.left()):
                schedule.handed(actor, [])
                send(actor, [])

        results = []

        def fail(clients, reason: str) -> None:
            results.extend(ClientFailure(c, reason) for c in clients)
            returned.update(clients)

        def drop(actor: int, chunk: list[int], reason: str) -> None:
            """`actor` is done with `chunk` without updates: its clients failed this round."""
            schedule.done(actor, chunk)
            fail(chunk, reason)

        def lose_claims(actor: int, reason: str) -> None:
            """`actor` failed: it claims nothing more from the pool, and what it claimed and never
            returned failed too."""
            if pool is not None:
                pool.close(actor)
                fail([c for c in pool.claimed_by(actor) if c not in returned], reason)

        for held in (1, 2):  # every actor's first chunk before anyone's second: all start early
            for actor in range(len(self.actors)):
                fill(actor, held)
        reclaim()
        timed_out = False
        while pending and not timed_out:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            if not ready:
                timed_out = True
                break
            actor, cs = pending.pop(ready[0])
            try:
                out = ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                error = type(exc).__name__
                log.warning("actor for clients %s failed in round %d: %s", cs, round_idx, error)
                drop(actor, cs, error)
                lose_claims(actor, error)
                self.restarting.add(actor)
                schedule.close(actor)
                if isinstance(exc, ray.exceptions.RayActorError):
                    # An actor runs its tasks in order: its later chunks never started. One that may
                    # still be alive (unavailable) is killed, but might yet start them before the kill
                    # lands, writing the rows of whoever took them over: they are dropped instead.
                    unavailable = isinstance(exc, ray.exceptions.ActorUnavailableError)
                    if unavailable:
                        ray.kill(self.actors[actor], no_restart=False)
                    for ref in [ref for ref, (a, _) in pending.items() if a == actor]:
                        later = pending.pop(ref)[1]
                        if unavailable:
                            drop(actor, later, error)
                        else:
                            schedule.give_back(actor, later)
                for other in range(len(self.actors)):
                    fill(other)
                    nudge(other)
                reclaim()
                continue
            if isinstance(out, str):
                # The actor needs the full round: Ray restarted it unseen (killed while idle, so no
                # chunk failed), or it cannot open the shared matrix. The chunk is still its own.
                if out == NO_MATRIX and self.nodes[actor] is not None:
                    log.info("actor %d cannot open the shared matrix: it gets full rounds from now on", actor)
                    self.nodes[actor] = None
                if expired():
                    drop(actor, cs, "timeout")  # too late to run it: its clients did not run in time
                    continue
                log.info("chunk %s of round %d sent again with the full round (%s)", cs, round_idx, out)
                send(actor, cs, resend=True)
                self.resent_chunks += 1
                continue
            schedule.done(actor, cs)
            part, stashed = out
            self.guest_updates += sum(isinstance(u, ClientUpdate) and self._home(u.client_id) != actor for u in part)
            self.pool_updates += sum(isinstance(u, ClientUpdate) and u.client_id in pooled and u.client_id not in cs
                                     for u in part)
            if not cs and not part:
                claims_nothing.add(actor)
            fill(actor)  # before reading the results: the actor works meanwhile
            nudge(actor)
            for u in part:
                if u.client_id in stashed:
                    _take_from_row(u, stashed[u.client_id], shared, rows[u.client_id], layout)
                    self.shared_updates += "delta" in stashed[u.client_id]
                    self.shared_prototypes += u.prototypes is not None
            results.extend(part)
            returned.update(u.client_id for u in part)
            reclaim()
        if pooled:
            pool.close()  # nobody claims from here on
            for c in pool.take_back():
                schedule.put_back(self._home(c), [c])
        for actor, cs in pending.values():
            log.warning("clients %s ran past the round timeout (%ss) in round %d", cs, self.timeout, round_idx)
            ray.kill(self.actors[actor], no_restart=False)
            self.restarting.add(actor)
            fail(cs, "timeout")
            lose_claims(actor, "timeout")
        # Clients never started: time ran out, or their actor failed and nobody could take them over.
        reason = "timeout" if expired() else "actor failed"
        results.extend(ClientFailure(c, reason) for c in schedule.remaining())
        updates, failed = split_results(results)
        return sorted(updates, key=lambda u: u.client_id), sorted(failed)

    def _shared_matrix(self, num_rows: int, width: int, params: torch.Tensor) -> SharedRows | None:
        """The shared matrix, with at least `num_rows` rows of `width` (None where shared memory is
        not available). A timed-out actor is killed and waited for before the next call, so no chunk
        of an earlier call can still be writing into the rows being read."""
        if params.dtype != torch.float32 or self.shared_unavailable:
            return None
        if self.shared is None or self.shared.shape[0] < num_rows or self.shared.shape[1] != width:
            if self.shared is not None:
                self.shared.close()
            self.shared = SharedRows.create(num_rows, width)
            if self.shared is None:
                self.shared_unavailable = True
                log.warning("no room for %d client deltas in %s: for this run they come back through the "
                            "object store", num_rows, SHM_DIR)
        return self.shared

    def _tail_pool(self, clients: int) -> TailPool | None:
        """The tail pool, with room for `clients` (None where it cannot be made: no room)."""
        if self.pool is None or self.pool.capacity < clients:
            if self.pool is not None:
                self.pool.release()
            try:
                self.pool = TailPool(len(self.actors), clients)
            except OSError as exc:
                log.warning("no tail pool in %s (%s): a round's last clients go out as chunks", SHM_DIR, exc)
                self.pool = None
        return self.pool

    def _await_restarts(self, limit_s: float = 120.0) -> None:
        """Wait until actors that failed last round are back (a call to a restarting actor fails),
        with their clients attached, so that attaching does not count against the round's timeout."""
        deadline = time.monotonic() + limit_s
        for a in sorted(self.restarting):
            while True:
                try:
                    self.nodes[a] = ray.get(self.actors[a].ping.remote(self.federation_arg),
                                            timeout=max(1.0, deadline - time.monotonic()))
                    break
                except ray.exceptions.ActorDiedError:
                    log.warning("actor %d is gone for good (max_restarts reached)", a)
                    self.gone.add(a)
                    break
                except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
        self.restarting.clear()

    def client_state(self) -> dict[int, dict]:
        states = ray.get([a.client_state.remote(list(range(i * self.per_actor, (i + 1) * self.per_actor)),
                                                self.federation_arg) for i, a in enumerate(self.actors)])
        return {c: s for part in states for c, s in part.items()}

    def load_client_state(self, states: dict[int, dict]) -> None:
        groups: dict[int, dict] = {}
        for c, s in states.items():
            groups.setdefault(self._home(c), {})[c] = s
        ray.get([self.actors[a].load_client_state.remote(g, self.federation_arg) for a, g in groups.items()])

    def evaluate_local(self, params: torch.Tensor, clients) -> list[dict]:
        """Personal retrieval, evaluated where the personal adapters live; results in the order given."""
        params_ref = ray.put(params)
        groups = self._by_actor(clients)
        results = ray.get([self.actors[a].evaluate_local.remote(params_ref, cs, self.federation_arg)
                           for a, cs in groups])
        by_client = {c: m for (_, cs), ms in zip(groups, results) for c, m in zip(cs, ms)}
        return [by_client[int(c)] for c in clients]

    def _home(self, client: int) -> int:
        """The actor that keeps the client's data and state."""
        return int(client) // self.per_actor

    def _by_actor(self, clients) -> list[tuple[int, list[int]]]:
        """Clients grouped by home actor."""
        groups: dict[int, list[int]] = {}
        for c in clients:
            groups.setdefault(self._home(c), []).append(int(c))
        return sorted(groups.items())

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.shared is not None:
            self.shared.close()
            self.shared = None
        if self.pool is not None:
            self.pool.release()
            self.pool = None

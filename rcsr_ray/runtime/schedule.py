"""Handing a round's clients to workers a chunk at a time (no Ray here, so it is testable alone).

Each worker starts on its home clients (where their data and state live), largest first. A worker
asks for its next chunk when one is done, so a worker that runs slow (a busy core, a bigger client)
simply gets less. When updates keep no client state, a worker whose own clients are done takes the
smallest remaining clients of the worker with the most work left. Chunks shrink as the round drains
(guided self-scheduling). With stealing, a worker gets half of what it still needs to end level
with the others, counting the work it already holds (a backend keeps a chunk queued ahead on each
worker), and a worker that holds work gets no client that would take it past that level, so the
round's last clients go, one at a time, to whoever runs out first. Without stealing nothing can be
levelled: a worker gets half of its own clients' work left.
"""
from __future__ import annotations

from collections import deque

import numpy as np


class RoundSchedule:
    def __init__(self, home: dict[int, list[int]], work: np.ndarray, num_workers: int, steal: bool):
        """`home`: worker -> its clients sampled this round; `work`: every client's relative cost."""
        self.work = np.asarray(work, np.float64)
        self.steal = steal
        self.queues = {w: deque(self._largest_first(home.get(w, []))) for w in range(num_workers)}
        self.closed: set[int] = set()  # workers that failed this round: they get nothing more
        self.held = dict.fromkeys(range(num_workers), 0.0)  # work handed out and not yet done, per worker
        self.chunks_held = dict.fromkeys(range(num_workers), 0)  # and its chunks (held work can be 0)

    def _largest_first(self, clients) -> list[int]:
        """`clients` by work, largest first, then by id."""
        return sorted(clients, key=lambda c: (-self.work[c], c))

    def _left(self, worker: int) -> float:
        """Work still queued for `worker`."""
        return float(self.work[list(self.queues[worker])].sum())

    def next_chunk(self, worker: int) -> list[int]:
        """The clients `worker` should run next ([] when there is nothing for it)."""
        if worker in self.closed:
            return []
        source, end = worker, 0  # own clients from the front: largest first
        if not self.queues[worker]:
            if not self.steal:
                return []
            busy = [w for w, q in self.queues.items() if q]
            if not busy:
                return []
            # Someone else's from the back: smallest first, leaving them their big ones.
            source, end = max(busy, key=lambda w: (self._left(w), -w)), -1
        if self.steal:
            # Level finish: the open workers' share of all work not yet done, less what this one holds.
            open_workers = [w for w in self.queues if w not in self.closed]
            pool = sum(self._left(w) for w in self.queues) + sum(self.held[w] for w in open_workers)
            need = pool / len(open_workers) - self.held[worker]
        else:
            need = self._left(worker)  # its own clients are all it will ever run
        queue, chunk, size = self.queues[source], [], 0.0
        if self.chunks_held[worker] and need < self.work[queue[end]]:
            # Queued behind its running chunk, the next client would leave this worker last: it asks
            # again when a chunk is done, and the client goes to whoever is free first.
            return []
        take = queue.popleft if end == 0 else queue.pop
        while queue and (not chunk or size + self.work[queue[end]] <= need / 2):
            c = take()
            chunk.append(c)
            size += self.work[c]
        self.held[worker] += size
        self.chunks_held[worker] += 1
        return chunk

    def done(self, worker: int, chunk: list[int]) -> None:
        """`worker` finished (or failed) `chunk`."""
        self.held[worker] -= float(self.work[chunk].sum())
        self.chunks_held[worker] -= 1

    def close(self, worker: int) -> None:
        """`worker` failed: it gets no more clients (with stealing, the others take its queue)."""
        self.closed.add(worker)

    def give_back(self, worker: int, clients: list[int]) -> None:
        """Clients handed to `worker` that it never started (it died first)."""
        self.done(worker, clients)
        self.queues[worker].extend(clients)

    def queued(self) -> int:
        """How many clients are not yet handed out."""
        return sum(map(len, self.queues.values()))

    def drain(self) -> list[int]:
        """Every client not yet handed out, largest first (then by id); none are left after. For a
        backend whose workers take those clients themselves when free (`shared_rows.TailPool`)."""
        clients = self._largest_first(c for q in self.queues.values() for c in q)
        for q in self.queues.values():
            q.clear()
        return clients

    def handed(self, worker: int, chunk: list[int]) -> None:
        """`worker` holds `chunk`, handed to it apart from `next_chunk` (it reports it `done` too)."""
        self.held[worker] += float(self.work[chunk].sum())
        self.chunks_held[worker] += 1

    def put_back(self, worker: int, clients: list[int]) -> None:
        """Clients taken out (`drain`) and never run: in `worker`'s queue again."""
        self.queues[worker].extend(self._largest_first(clients))

    def remaining(self) -> list[int]:
        """Clients never handed out."""
        return sorted(c for q in self.queues.values() for c in q)

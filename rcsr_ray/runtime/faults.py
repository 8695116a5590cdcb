"""Running a batch of client updates so that one failing client never sinks the others, and
injected faults (`runtime.faults`) for exercising that path: `kind@round:client[,...]` with kind
raise (the update raises), die (the worker process exits; in the local backend it raises) or hang
(the update sleeps past any round timeout). A fault fires on a round's first attempt only, so a
retried round can succeed.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rcsr_ray.fl.client import ClientSettings, ClientUpdate, ClientWorker, GlobalState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientFailure:
    client_id: int
    error: str


class InjectedFault(RuntimeError):
    pass


def run_clients(worker: ClientWorker, clients, state: GlobalState, settings: ClientSettings, seed: int,
                round_idx: int, attempt: int, faults: dict, in_process: bool,
                out: Callable[[int], torch.Tensor | None] | None = None) -> list[ClientUpdate | ClientFailure]:
    """Each client's update, or a ClientFailure if it raised; `in_process` turns `die` into a raise;
    `out(client)`, if given, is where that client's delta is written (see `ClientWorker.update`)."""
    results = []
    for c in clients:
        c = int(c)
        try:
            kind = faults.get((round_idx, c)) if attempt == 0 else None
            if kind == "die" and not in_process:
                os._exit(1)
            if kind == "hang":
                time.sleep(3600)
            if kind is not None:
                raise InjectedFault(f"injected {kind} fault in round {round_idx}, client {c}")
            results.append(worker.update(c, state, settings, seed, round_idx, out(c) if out else None))
        except Exception as exc:  # a failing client is dropped from the round, never the run
            log.warning("client %d failed in round %d: %r", c, round_idx, exc)
            results.append(ClientFailure(c, repr(exc)))
    return results


def split_results(results) -> tuple[list[ClientUpdate], list[int]]:
    updates = [r for r in results if isinstance(r, ClientUpdate)]
    failed = [r.client_id for r in results if isinstance(r, ClientFailure)]
    return updates, failed

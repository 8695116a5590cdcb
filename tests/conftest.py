"""Shared fixtures: a small benchmark config and one Ray instance for the whole session."""
from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rcsr_ray.config import load_config

SMALL = {
    "data.synthetic.train_images": 600,
    "data.synthetic.test_images": 120,
    "data.synthetic.dim": 64,
    "data.synthetic.concepts": 8,
    "data.synthetic.attributes": 10,
    "data.synthetic.instance_dim": 16,
    "partition.num_clients": 6,
    "partition.clusters": 8,
    "model.adapter.bottleneck": 16,
    "train.batch_size": 32,
    "train.local_epochs": 1,
    "fed.method": "fedavg",
    "fed.rounds": 3,
    "eval.every": 1,
}


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread, as client updates use (runtime.torch_threads): tiny matrices run faster
    without thread hand-offs, above all on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("feature-cache"))


@pytest.fixture
def small_config(cache_dir):
    """A config that trains in well under a second; extra dotted keys override it."""

    def make(**overrides):
        keys = {**SMALL, "data.cache_dir": cache_dir, "runtime.backend": "local"}
        keys.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_config(overrides=keys)

    return make


def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1 (all held open until all are chosen)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def descendants(pid: int) -> list[int]:
    """`pid`'s child processes, theirs, and so on (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the name before may hold anything
        except (OSError, IndexError, ValueError):  # exited meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.extend(kids := children.get(todo.pop(), []))
        todo.extend(kids)
    return found


def listening_sockets(pids) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of every TCP socket that processes `pids` listen on (Linux /proc)."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # exited meanwhile
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:  # closed meanwhile (the listing's own descriptor, for one)
                continue
            if link.startswith("socket:["):
                inodes.add(link[len("socket:["):-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: listening
                host, port = fields[1].split(":")
                raw = bytes.fromhex(host)  # 32-bit words, each in the host's (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((ipaddress.ip_address(raw), int(port, 16)))
    return found


def is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as Ray's gRPC servers bind
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for all tests that need it, bound to 127.0.0.1, 2 CPUs, with a
    Prometheus metrics endpoint at http://127.0.0.1:<ray_session.metrics_port>/metrics and the GCS
    address for the state API in `ray_session.address`."""
    import ray  # a dependency: if it cannot be imported, these tests fail rather than skip
    from rcsr_ray.runtime.connect import start_local_ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    (port,) = free_ports(1)
    # The dashboard serves the state API (actor listings); bound to loopback. Metrics are pushed
    # to the exporter every second instead of every ten, so tests see them quickly.
    context = start_local_ray(num_cpus=2, include_dashboard=True, _metrics_export_port=port,
                              _system_config={"metrics_report_interval_ms": 1000}, configure_logging=False,
                              log_to_driver=False)
    # Tests pass `address` to the state API: other Ray instances may run on this machine.
    yield SimpleNamespace(metrics_port=port, address=context.address_info["gcs_address"])
    ray.shutdown()

"""Shared fixtures: a small benchmark config and one Ray instance for the whole session."""
from __future__ import annotations

import os
import socket
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


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for all tests that need it, bound to 127.0.0.1, 2 CPUs, with a
    Prometheus metrics endpoint at http://127.0.0.1:<ray_session.metrics_port>/metrics and the GCS
    address for the state API in `ray_session.address`."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    (port,) = free_ports(1)
    # The dashboard serves the state API (actor listings); bound to loopback. Metrics are pushed
    # to the exporter every second instead of every ten, so tests see them quickly.
    context = ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 1000},
             configure_logging=False, log_to_driver=False)
    # Tests pass `address` to the state API: other Ray instances may run on this machine.
    yield SimpleNamespace(metrics_port=port, address=context.address_info["gcs_address"])
    ray.shutdown()

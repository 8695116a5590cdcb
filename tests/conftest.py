"""Shared fixtures: a small benchmark config and one Ray instance for the whole session."""
from __future__ import annotations

import os

import pytest

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


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for all tests that need it, bound to 127.0.0.1, 2 CPUs."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # The dashboard serves the state API (actor listings); bound to loopback.
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             configure_logging=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()

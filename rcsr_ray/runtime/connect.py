"""Joining or starting the Ray instance of a run, apart from the backend so that it needs neither
torch nor the client code: `rcsr-ray run` starts Ray while torch is imported beside it."""
from __future__ import annotations

import os

import ray
from ray._private import ray_constants

from rcsr_ray.config import Config


def ensure_ray(cfg: Config) -> None:
    """Join the cluster named by runtime.address / RAY_ADDRESS, else start a local instance on 127.0.0.1."""
    if ray.is_initialized():
        return
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    start_local_ray(num_cpus=cfg.runtime.num_cpus, include_dashboard=False, log_to_driver=True,
                    configure_logging=False)


def start_local_ray(**init_args):
    """Start a Ray instance on this machine whose servers (GCS, raylet, object manager, workers,
    dashboard and its agent, metrics export) all listen on 127.0.0.1 only; `ray.init`'s context.

    Ray turns a loopback node address into the machine's outward one, so that other nodes could
    join, and then listens on every interface, tokens or not. It keeps loopback where multi-node
    clusters are off (its default on Windows and macOS); they are off while this instance starts
    (its daemons and their workers keep that setting), and on again after, so that this process
    could still join a cluster later."""
    env = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    before, enabled = os.environ.get(env), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[env], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        return ray.init(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", **init_args)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = enabled
        if before is None:
            del os.environ[env]
        else:
            os.environ[env] = before

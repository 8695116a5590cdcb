"""Joining or starting the Ray instance of a run, apart from the backend so that it needs neither
torch nor the client code: `rcsr-ray run` starts Ray while torch is imported beside it."""
from __future__ import annotations

import os

import ray

from rcsr_ray.config import Config


def ensure_ray(cfg: Config) -> None:
    """Join the cluster named by runtime.address / RAY_ADDRESS, else start a local instance on 127.0.0.1."""
    if ray.is_initialized():
        return
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(num_cpus=cfg.runtime.num_cpus, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
             include_dashboard=False, log_to_driver=True, configure_logging=False)

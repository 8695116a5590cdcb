"""The driver actor: same results as the local loop, named actors, metrics on the Prometheus endpoint."""
import re
import threading
import time
import urllib.request

import pytest
import torch

from rcsr_ray.data.store import StoreError
from rcsr_ray.runtime.loop import run_simulation
from rcsr_ray.runtime.ray_backend import gpu_advice, plan_actors
from tests.cluster_util import rcsr_samples


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _run_samples(text: str, run: str) -> dict[str, float]:
    """The run's `ray_rcsr_*` samples in a Prometheus text, by metric name."""
    return {name: value for name, labels, value in rcsr_samples(text) if labels.get("run") == run}


def test_driver_actor_run_names_and_metrics(small_config, ray_session, tmp_path):
    import ray
    from ray.util.state import list_actors

    from rcsr_ray.runtime.driver import run_on_ray

    keys = {"fed.rounds": 8, "eval.every": 2, "fed.participation": 1.0, "rcsr.router_hidden": 32}
    local = run_simulation(small_config(**keys), progress=False)
    out = tmp_path / "drv-run"
    result, seen = {}, set()
    thread = threading.Thread(target=lambda: result.update(
        r=run_on_ray(small_config(**keys, **{"runtime.backend": "ray"}), out, progress=False)))
    thread.start()
    # Named live actors, polled from the GCS (a few ms a call: the run may take under a second).
    while thread.is_alive():
        seen |= {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        time.sleep(0.01)
    thread.join()
    ray_run = result["r"]
    names = {"rcsr-driver-drv-run", "rcsr-clients-0-2", "rcsr-clients-3-5"}
    assert names <= seen
    # Ray's state API (the dashboard's view) lists them under those names too (alive or gone by now).
    listed = {a.name for a in list_actors(address=ray_session.address, limit=10000)}
    assert names <= listed
    # The driver actor runs the same loop: bit-identical to the local backend.
    assert torch.equal(local.params, ray_run.params)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(local.metrics) == drop(ray_run.metrics)
    assert (out / "summary.json").is_file() and (out / "metrics.csv").is_file()

    # The run's gauges and counters reach Prometheus (pushed every second in the test session).
    summary, deadline = ray_run.summary, time.monotonic() + 30
    while True:
        text = _scrape(ray_session.metrics_port)
        samples = _run_samples(text, "drv-run")
        if samples.get("ray_rcsr_round") == 8.0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert samples.get("ray_rcsr_round") == 8.0
    assert samples.get("ray_rcsr_mean_r1") == pytest.approx(summary["mean_r1"])
    assert samples.get("ray_rcsr_rsum") == pytest.approx(summary["rsum"])
    assert samples.get("ray_rcsr_client_rounds_completed_total") == summary["completed_client_rounds"] == 48
    assert samples.get("ray_rcsr_round_seconds") > 0
    assert re.search(r'^# (HELP|TYPE) ray_rcsr_mean_r1', text, re.M)


def test_driver_actor_errors_come_out_unwrapped(small_config, ray_session, tmp_path):
    from rcsr_ray.runtime.driver import run_on_ray

    cfg = small_config(**{"runtime.backend": "ray", "data.source": "features", "data.path": str(tmp_path / "none")})
    with pytest.raises(StoreError, match="not a feature store"):
        run_on_ray(cfg, tmp_path / "bad", progress=False)


def test_plan_actors_respects_gpu_shares():
    # 8 CPUs and 1 GPU at 0.25 per actor: 4 actors, so 10 clients pack 3 to an actor.
    assert plan_actors(10, 8, 1.0, None, cluster_gpus=1, client_gpus=0.25) == 3
    assert plan_actors(10, 8, 1.0, None) == 2  # CPUs only: 8 actors
    assert plan_actors(3, 8, 1.0, None, cluster_gpus=1, client_gpus=0.1) == 1
    assert plan_actors(10, 8, 1.0, 4, cluster_gpus=1, client_gpus=0.25) == 4  # as asked


def test_gpu_client_actors_on_cached_features_are_advised_against(small_config):
    assert "runtime.client_gpus=0.1 on cached features" in gpu_advice(small_config(), 0.1)
    assert gpu_advice(small_config(), 0.0) is None  # no GPU share: nothing to say
    blocks = small_config()
    blocks.model.adapter.placement = "blocks"  # (a valid blocks config needs a feature store of images)
    assert gpu_advice(blocks, 0.1) is None  # the backbone wants the GPU


def test_driver_actor_stopped_and_restarted_resumes_bit_identical(small_config, ray_session, tmp_path):
    from rcsr_ray.runtime.driver import run_on_ray
    from rcsr_ray.runtime.loop import StopAfter

    keys = {"fed.method": "rcsr", "rcsr.personal": True, "partition.missing_rate": 0.5, "fed.rounds": 4,
            "runtime.checkpoint_every": 2, "rcsr.router_hidden": 32}
    whole = run_simulation(small_config(**keys), progress=False)
    ray_keys = {**keys, "runtime.backend": "ray"}
    with pytest.raises(StopAfter):  # the driver actor stops after round 2, its checkpoint written
        run_on_ray(small_config(**ray_keys), tmp_path / "cut", progress=False, stop_after=2)
    resumed = run_on_ray(small_config(**ray_keys), tmp_path / "cut", progress=False)
    assert torch.equal(whole.params, resumed.params)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(whole.metrics) == drop(resumed.metrics)
    assert whole.clients.equals(resumed.clients)  # personal adapters came back from the checkpoint

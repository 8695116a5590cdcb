"""Cluster operation: the cluster launcher configs, and a run submitted with `ray job submit` to a Ray
head started by the test (token authentication on), watched through the state API and the metrics
endpoint as a user would watch it in the dashboard."""
from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import SMALL, descendants, free_ports, is_loopback, listening_sockets

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("cluster.yaml", "local.yaml")
BIN = Path(sys.executable).parent  # the venv's bin: ray, rcsr-ray


def quick_start_install() -> list[str]:
    """The install of the README's Quick start, as its `&&`-separated steps: what every command of the
    Quick start block runs before its own work (`rcsr-ray run`, pytest)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]
    prefixes = set()
    for command in commands:
        steps = [s.strip() for s in command.split("&&")]
        installs = [i for i, s in enumerate(steps) if s.startswith("pip install")]
        assert installs, f"README Quick start: no pip install in {command!r}"
        prefixes.add(tuple(steps[:installs[-1] + 1]))
    assert len(prefixes) == 1, f"README Quick start: the commands install differently: {prefixes}"
    return list(prefixes.pop())


def launcher_config(name: str) -> dict:
    """The config as `ray up` sees it: defaults filled in, setup commands merged per node kind."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(yaml.safe_load((ROOT / "cluster" / name).read_text()))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_against_ray_launcher_schema(name):
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    config = launcher_config(name)
    validate_config(config)  # ray/autoscaler/ray-schema.json, as `ray up` does
    broken = copy.deepcopy(config)
    broken["max_worker"] = broken.pop("max_workers")  # a misspelled key must be caught
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_installs_as_readme_and_keeps_dashboard_private(name):
    install = quick_start_install()
    config = launcher_config(name)
    code_dir = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    assert "~/.ray/auth_token" in config["file_mounts"], "every node needs the cluster's auth token"
    for kind in ("head", "worker"):
        installs = [c for c in config[f"{kind}_setup_commands"]
                    if [s.strip() for s in c.split("&&")][1:] == install]
        assert installs, f"{name}: no {kind} setup command runs the README install {' && '.join(install)!r}"
        assert installs[0].split("&&")[0].strip() == f"cd {code_dir}", f"{name}: install outside {code_dir}"
        start = " ".join(config[f"{kind}_start_ray_commands"])
        assert "RAY_AUTH_MODE=token ray start" in start and "--metrics-export-port=" in start, start
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, head_start
    if name == "cluster.yaml":
        workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
        gpu = [v for v in workers.values() if v["node_config"]["InstanceType"].startswith(("g", "p"))]
        assert gpu and 1 <= gpu[0]["min_workers"] <= gpu[0]["max_workers"]
    else:
        assert config["provider"]["type"] == "local" and config["provider"]["head_ip"]
        assert config["provider"]["worker_ips"]


# -- a Ray head of the test's own, and a job on it ---------------------------------------------------


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on 127.0.0.1 with token authentication, its own ports and temp dir.

    Not `ray stop` at the end: it stops every Ray process of the machine, the session's Ray instance
    and other people's included. SIGTERM to the blocking `ray start` shuts down exactly this node's
    processes; anything left that runs from our temp dir is killed by pid."""
    temp = Path(tempfile.mkdtemp(prefix="rcsr-head-", dir="/tmp"))  # Ray's socket paths must stay short
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    gcs, dash, metrics, client, agent, agent_grpc, env_agent = free_ports(7)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # job entrypoints find rcsr-ray, as in the venv
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # no drain wait on SIGTERM
               RAY_metrics_report_interval_ms="1000",  # metrics reach the endpoint within seconds (default 10 s)
               # Else Ray swaps --node-ip-address 127.0.0.1 for the machine's outward address and listens
               # on every interface (see rcsr_ray.runtime.connect.start_local_ray).
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    log = open(temp / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--metrics-export-port", str(metrics),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(env_agent),
         "--num-cpus", "2", "--temp-dir", str(temp / "ray"), "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    info = {"dashboard": f"http://127.0.0.1:{dash}", "metrics": f"http://127.0.0.1:{metrics}/metrics",
            "env": env, "token": token.read_text(), "pid": head.pid,
            "gcs": gcs}
    try:
        _wait_for_dashboard(info, head, temp / "head.log")
        yield info
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        for pid in pids_running_from(temp):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def pids_running_from(folder: Path) -> list[int]:
    """Processes whose command line names `folder` (the head's processes all name its temp dir)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(folder).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # exited meanwhile
            pass
    return pids


def _wait_for_dashboard(info: dict, head: subprocess.Popen, log: Path, limit_s: float = 90.0) -> None:
    """Until the job API answers an authenticated request."""
    request = urllib.request.Request(info["dashboard"] + "/api/jobs/",
                                     headers={"Authorization": f"Bearer {info['token']}"})
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited ({head.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"Ray head not up after {limit_s:.0f} s:\n{log.read_text()[-3000:]}")


def test_head_rejects_clients_without_the_token(ray_head):
    request = urllib.request.Request(ray_head["dashboard"] + "/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 401


def test_head_listens_on_loopback_only(ray_head):
    """`ray start --head --node-ip-address 127.0.0.1` and every process it starts accept connections
    on 127.0.0.1 only."""
    sockets = listening_sockets([ray_head["pid"], *descendants(ray_head["pid"])])
    assert [s for s in sockets if not is_loopback(s[0])] == []
    assert {ray_head["gcs"], urllib.parse.urlsplit(ray_head["dashboard"]).port} <= {port for _, port in sockets}


def test_job_submit_runs_a_simulation_watched_in_state_api_and_metrics(ray_head, tmp_path):
    # Rounds take milliseconds here; 200 of them keep the run observable for seconds.
    rounds = 200
    out = tmp_path / "run-on-cluster"
    keys = {**SMALL, "fed.rounds": rounds, "data.cache_dir": str(tmp_path / "cache")}
    job_id = f"rcsr-test-{secrets.token_hex(4)}"
    dashboard, env = ray_head["dashboard"], ray_head["env"]
    watcher = subprocess.Popen(
        [sys.executable, "-m", "tests.cluster_util", dashboard, ray_head["metrics"], job_id, out.name],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--submission-id", job_id, "--",
         "rcsr-ray", "run", "--quiet", "--out", str(out), *(f"{k}={v}" for k, v in keys.items())],
        env=env, capture_output=True, text=True, timeout=240)
    watched, watch_err = watcher.communicate(timeout=180)
    assert submit.returncode == 0 and f"Job '{job_id}' succeeded" in submit.stdout, submit.stdout[-3000:]
    # The run joined the head instead of starting a Ray instance of its own.
    assert "Connected to Ray cluster" in submit.stdout, submit.stdout[-3000:]
    assert watcher.returncode == 0, watch_err[-3000:]
    seen = json.loads(watched)
    assert seen["status"] == "SUCCEEDED"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == rounds
    per_round = pd.read_csv(out / "metrics.csv").set_index("round")

    # Every client had a named actor alive during the run (one client each, or a block of them).
    clients = set()
    for name in seen["alive"]:
        m = re.fullmatch(r"rcsr-client-(\d+)|rcsr-clients-(\d+)-(\d+)", name)
        if m:
            first, last = (int(m[1]), int(m[1])) if m[1] else (int(m[2]), int(m[3]))
            clients.update(range(first, last + 1))
    assert clients == set(range(SMALL["partition.num_clients"])), seen["alive"]
    assert any(n.startswith("rcsr-driver") for n in seen["alive"]), f"no rcsr-driver actor in {seen['alive']}"

    # The run's metrics reached Prometheus during the run, tagged with the run, with the run folder's
    # numbers. Rounds here take a fraction of Ray's one-second export, and one scrape can mix gauges
    # from different exports, so a scrape's recall is that of some round of the run, not
    # necessarily of the round its round gauge shows.
    scrapes = [s for s in seen["scrapes"] if "ray_rcsr_round" in s and "ray_rcsr_mean_r1" in s]
    assert scrapes, seen["scrapes"][:3]
    for s in scrapes:
        r = int(s["ray_rcsr_round"])
        assert 1 <= r <= rounds
        for metric, column in (("ray_rcsr_mean_r1", "mean_r1"), ("ray_rcsr_rsum", "rsum")):
            expected = per_round[column].dropna().to_numpy()
            assert np.isclose(expected, s[metric], rtol=1e-9).any(), (r, metric, s[metric], expected)
    completed = [s["ray_rcsr_client_rounds_completed_total"] for s in scrapes
                 if "ray_rcsr_client_rounds_completed_total" in s]
    assert completed and completed == sorted(completed), completed
    assert 0 < completed[-1] <= summary["completed_client_rounds"]

"""Watch a Ray job from outside the test process: `python -m tests.cluster_util DASHBOARD METRICS JOB_ID RUN`.

It runs as a separate process so that it authenticates with the token of the test's own Ray head (Ray
loads the token once per process; the pytest process may hold the session Ray instance's). Until the job
ends it polls Ray's state API for alive actors and the metrics endpoint for `ray_rcsr_` samples, then
prints one JSON object: the job's final status, every actor name seen alive while the job was running,
and the scrapes taken while it was running, each as {metric name: value} of the samples tagged with
the run RUN.
"""
from __future__ import annotations

import json
import re
import sys
import time
import urllib.request

SAMPLE = re.compile(r"^(ray_rcsr_\w+)\{(.*)\}\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def rcsr_samples(text: str) -> list[tuple[str, dict, float]]:
    """The `ray_rcsr_*` samples of a Prometheus text exposition."""
    found = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            found.append((m.group(1), dict(LABEL.findall(m.group(2))), float(m.group(3))))
    return found


def watch(dashboard: str, metrics_url: str, job_id: str, run: str, limit_s: float = 150.0,
          every_s: float = 0.5) -> dict:
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    client = JobSubmissionClient(dashboard)
    alive: set[str] = set()
    scrapes: list[dict[str, float]] = []
    status = None
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            status = client.get_job_status(job_id)
        except RuntimeError:  # not submitted yet
            time.sleep(every_s)
            continue
        if status.is_terminal():
            break
        if status == JobStatus.RUNNING:
            actors = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
            alive.update(a.name for a in actors if a.name)
            try:
                with urllib.request.urlopen(metrics_url, timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                text = ""
            scrape = {name: value for name, labels, value in rcsr_samples(text) if labels.get("run") == run}
            if scrape:
                scrapes.append(scrape)
        time.sleep(every_s)
    return {"status": status.value if status else None, "alive": sorted(alive), "scrapes": scrapes}


if __name__ == "__main__":
    print(json.dumps(watch(*sys.argv[1:5])))

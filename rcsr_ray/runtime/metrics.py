"""The run's own metrics for the Ray dashboard and Prometheus (`ray.util.metrics`).

Prometheus shows them with Ray's prefix: `ray_rcsr_round`, `ray_rcsr_mean_r1`, ... each tagged
`run` (the run folder's name). The same numbers go to the run folder's metrics.csv.
"""
from __future__ import annotations

import math

GAUGES = {
    "rcsr_round": "last completed round",
    "rcsr_mean_r1": "global mean R@1 (%) at the last evaluated round",
    "rcsr_i2t_r1": "global image-to-text R@1 (%) at the last evaluated round",
    "rcsr_t2i_r1": "global text-to-image R@1 (%) at the last evaluated round",
    "rcsr_rsum": "global RSUM at the last evaluated round",
    "rcsr_router_entropy": "entropy of the fused aggregation weights (rcsr) in the last round",
    "rcsr_round_seconds": "wall seconds of the last round (training, aggregation, evaluation)",
}
COUNTERS = {
    "rcsr_client_rounds_completed": "client updates received",
    "rcsr_client_rounds_dropped": "client updates lost to a failure or timeout",
}
EVALUATED = {"rcsr_mean_r1": "mean_r1", "rcsr_i2t_r1": "i2t_r1", "rcsr_t2i_r1": "t2i_r1", "rcsr_rsum": "rsum"}


class RunMetrics:
    """Records one run's gauges and counters; only created where Ray is initialised."""

    def __init__(self, run: str):
        from ray.util.metrics import Counter, Gauge

        self.tags = {"run": run}
        self.gauges = {n: Gauge(n, d, tag_keys=("run",)) for n, d in GAUGES.items()}
        self.counters = {n: Counter(n, d, tag_keys=("run",)) for n, d in COUNTERS.items()}

    def round_done(self, round_idx: int, seconds: float, completed: int, dropped: int, agg: dict) -> None:
        self._set("rcsr_round", round_idx)
        self._set("rcsr_round_seconds", seconds)
        if "weight_entropy" in agg:
            self._set("rcsr_router_entropy", agg["weight_entropy"])
        if completed:
            self.counters["rcsr_client_rounds_completed"].inc(completed, tags=self.tags)
        if dropped:
            self.counters["rcsr_client_rounds_dropped"].inc(dropped, tags=self.tags)

    def evaluated(self, metrics: dict) -> None:
        for name, key in EVALUATED.items():
            self._set(name, metrics[key])

    def _set(self, name: str, value) -> None:
        value = float(value)
        if math.isfinite(value):
            self.gauges[name].set(value, tags=self.tags)

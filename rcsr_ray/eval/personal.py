"""Aggregates of per-client (personalized) retrieval: overall, per modality group, worst 10%, spread."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

GROUPS = ("paired", "image-only", "text-only")


def summarize_clients(clients: pd.DataFrame) -> dict:
    """`clients` has one row per client with `modality` (a group name), `i2t_r1` and `t2i_r1`.

    Keys: pers_mean_r1, pers_mean_r1_<group> (NaN when the group is empty), pers_worst10_r1 (mean R@1
    of the worst 10% of clients, at least one), pers_std_r1 (across clients).
    """
    r1 = 0.5 * (clients["i2t_r1"].to_numpy(float) + clients["t2i_r1"].to_numpy(float))
    out = {"pers_mean_r1": float(r1.mean()), "pers_std_r1": float(r1.std())}
    for group in GROUPS:
        sel = (clients["modality"] == group).to_numpy()
        out[f"pers_mean_r1_{group.replace('-', '_')}"] = float(r1[sel].mean()) if sel.any() else math.nan
    worst = max(1, int(math.ceil(0.1 * len(r1))))
    out["pers_worst10_r1"] = float(np.sort(r1)[:worst].mean())
    return out

"""The run folder: resolved config, per-round metrics, summary, final checkpoint, plots."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from rcsr_ray.config import Config
from rcsr_ray.data.partition import summary_frame
from rcsr_ray.eval.plots import pyplot, save_round_plot


def write_run(out: Path, cfg: Config, rows: list[dict], summary: dict, params: torch.Tensor, federation,
              clients: pd.DataFrame, router_rows: list[dict] | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)  # config.yaml is there already (`folder.write_config`)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "metrics.csv", index=False)
    frame.to_parquet(out / "metrics.parquet", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    clients.to_csv(out / "clients.csv", index=False)
    if router_rows:
        pd.DataFrame(router_rows).to_csv(out / "router.csv", index=False)
    summary_frame(federation.partition).to_csv(out / "partition.csv", index=False)
    torch.save({"params": params, "config": cfg.to_dict(), "summary": summary}, out / "final.pt")
    plot_curves(frame, out / "curves.png", title=f"{summary['method']} · preset {cfg.preset or '-'}")
    return out


def plot_curves(frame: pd.DataFrame, path: Path, title: str = "") -> None:
    fig, ax = pyplot().subplots(figsize=(8.4, 4.2), dpi=120)
    styles = {"i2t_r1": ("image→text R@1", "-", "C0"), "i2t_r5": ("image→text R@5", ":", "C0"),
              "t2i_r1": ("text→image R@1", "-", "C1"), "t2i_r5": ("text→image R@5", ":", "C1")}
    for key, (label, ls, color) in styles.items():
        ax.plot(frame["round"], frame[key], ls, color=color, marker="o", ms=3, label=label)
    save_round_plot(fig, ax, "recall (%)", title, path)

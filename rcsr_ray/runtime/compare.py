"""`rcsr-ray compare`: several methods on the same partitions and seeds, one table and one chart."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from rcsr_ray.config import Config, with_overrides
from rcsr_ray.eval.plots import pyplot
from rcsr_ray.runtime.folder import check
from rcsr_ray.runtime.loop import run_simulation

TABLE = (("mean_r1", "global R@1"), ("i2t_r1", "global i2t"), ("t2i_r1", "global t2i"),
         ("pers_mean_r1", "personal R@1"), ("pers_mean_r1_paired", "paired"),
         ("pers_mean_r1_image_only", "image-only"), ("pers_mean_r1_text_only", "text-only"),
         ("pers_worst10_r1", "worst 10%"))


def run_compare(base: Config, methods: list[str], seeds: list[int], out: Path, progress: bool = True) -> pd.DataFrame:
    """Every method x seed (the partition depends on the seed only, so methods share it)."""
    runs = {(method, seed): with_overrides(base, {"fed.method": method, "seed": seed})
            for seed in seeds for method in methods}
    for (method, seed), cfg in runs.items():  # every run's folder, before the first run's work
        check(out / f"{method}-seed{seed}", cfg)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (method, seed), cfg in tqdm(runs.items(), desc="compare", unit="run", disable=not progress):
        summary = run_simulation(cfg, out / f"{method}-seed{seed}", progress=False).summary
        zeroshot = summary.pop("zeroshot")
        rows.append({**summary, "zeroshot_mean_r1": zeroshot["mean_r1"]})
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "compare.csv", index=False)
    plot_compare(frame, methods, out / "compare.png")
    return frame


def format_table(frame: pd.DataFrame, methods: list[str]) -> str:
    """mean ± std per method over seeds."""
    head = f"{'method':<10}" + "".join(f"{label:>15}" for _, label in TABLE)
    lines = [head, "-" * len(head)]
    for m in methods:
        sub = frame[frame["method"] == m]
        cells = []
        for key, _ in TABLE:
            v = sub[key].dropna()
            cells.append(f"{v.mean():>8.2f} ± {v.std(ddof=0):<4.1f}" if len(v) else f"{'—':>15}")
        lines.append(f"{m:<10}" + "".join(cells))
    return "\n".join(lines)


def plot_compare(frame: pd.DataFrame, methods: list[str], path: Path) -> None:
    import numpy as np

    plt = pyplot()

    keys = [("mean_r1", "global (1k test)"), ("pers_mean_r1", "personalized (mean over clients)"),
            ("pers_worst10_r1", "personalized, worst 10%")]
    x = np.arange(len(methods))
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(methods) + 2), 4.2), dpi=120)
    for i, (key, label) in enumerate(keys):
        stats = frame.groupby("method")[key].agg(["mean", "std"]).reindex(methods)
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, stats["mean"], width, yerr=stats["std"].fillna(0),
               capsize=3, label=label)
    ax.set_xticks(x, methods)
    ax.set_ylabel("mean R@1 (%)")
    seeds = frame["seed"].nunique()
    ax.set_title(f"methods compared · preset {frame['preset'].iloc[0]} · {seeds} seed{'s' * (seeds > 1)} (± std)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(keys), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

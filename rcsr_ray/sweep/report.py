"""Reports of a sweep folder or a run folder: results table, heatmaps, R@1 curves, report.md.

Reads only files (no Ray): a sweep's trial folders (`trial.json`, `rounds.jsonl`, the run folder's
`summary.json`)
or a run folder (`summary.json`, `metrics.csv`), so it also reports on an interrupted sweep.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from rcsr_ray.config import ConfigError
from rcsr_ray.eval.plots import pyplot, save_round_plot
from rcsr_ray.sweep.spec import SPEC_FILE

TRIALS_DIR = "trials"
HEADLINE = ("mean_r1", "i2t_r1", "t2i_r1", "rsum", "pers_mean_r1", "pers_worst10_r1")
# Config keys every results row gets from the trial's resolved config, swept or not (the heatmap axes).
METHOD, ALPHA, MISSING = "fed.method", "partition.alpha", "partition.missing_rate"
AXES = (METHOD, ALPHA, MISSING, "seed")
BASELINE = "fedavg"


def run_folder(trial_dir: Path, trial_id: str) -> Path:
    """A trial's run folder; named after the trial so its dashboard metrics (tagged with the run
    folder's name) stay apart from concurrent trials'."""
    return trial_dir / f"run-{trial_id}"


def _read_rounds(path: Path) -> pd.DataFrame:
    """Per-round rows; a round reported twice (a trial resumed from its checkpoint) keeps its last row."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).drop_duplicates("round", keep="last").sort_values("round", ignore_index=True)


def _trial_info(trial_dir: Path) -> dict | None:
    """What the trial wrote when it started (trial.json), else what Tune wrote for a trial that failed
    before that (params.json), else None (not a trial folder)."""
    if (trial_dir / "trial.json").is_file():
        return json.loads((trial_dir / "trial.json").read_text())
    match = re.search(r"_([0-9a-f]{5}_\d{5})_", trial_dir.name)
    if (trial_dir / "params.json").is_file() and match:
        params = json.loads((trial_dir / "params.json").read_text())
        return {"trial_id": match.group(1), "params": params, "config": params, "start": math.nan}
    return None


def collect_trials(sweep_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results: one row per started trial, curves: one row per trial and evaluated round)."""
    sweep_dir = Path(sweep_dir)
    rows, curves, swept = [], [], []
    for trial_dir in sorted(p for p in (sweep_dir / TRIALS_DIR).iterdir() if p.is_dir()):
        info = _trial_info(trial_dir)
        if info is None:
            continue
        swept += [k for k in info["params"] if k not in swept]
        run = run_folder(trial_dir, info["trial_id"])
        summary_path = run / "summary.json"
        # a finished run's metrics.csv has every evaluated round and round 0 (zero-shot)
        rounds = pd.read_csv(run / "metrics.csv") if (run / "metrics.csv").is_file() and "end" in info \
            else _read_rounds(trial_dir / "rounds.jsonl")
        row = {"trial_id": info["trial_id"], **{k: info["config"].get(k) for k in (*info["params"], *AXES)}}
        if summary_path.is_file() and "end" in info:
            summary = json.loads(summary_path.read_text())
            row["status"] = "done"
            row.update({k: v for k, v in summary.items()
                        if not isinstance(v, dict) and k not in ("method", "seed", "preset")})
            row["zeroshot_mean_r1"] = summary["zeroshot"]["mean_r1"]
        else:  # stopped early (ASHA), failed or still running: its last evaluated round, if any
            row["status"] = "incomplete"
            row.update({k: rounds.iloc[-1][k] for k in ("round", *HEADLINE) if k in rounds and len(rounds)})
        row.update(trial_start=info["start"], trial_end=info.get("end", math.nan), trial_dir=trial_dir.name)
        rows.append(row)
        if len(rounds):
            curves.append(rounds.assign(trial_id=info["trial_id"], method=row[METHOD]))
    table = pd.DataFrame(rows)
    if len(table):
        table = table.assign(**{k: math.nan for k in ("mean_r1",) if k not in table})  # no trial got that far
        first = ["trial_id", "status", *swept, *[a for a in AXES if a not in swept]]
        table = table[first + [c for c in table.columns if c not in first]].sort_values("trial_id", ignore_index=True)
        table.attrs["keys"] = first[2:]  # the swept keys and the heatmap axes
    return table, (pd.concat(curves, ignore_index=True) if curves else pd.DataFrame())


def _alpha_label(a) -> str:
    return "IID" if a is None or (isinstance(a, float) and math.isnan(a)) else f"{a:g}"


def _alpha_order(labels) -> list[str]:
    return sorted(set(labels), key=lambda s: math.inf if s == "IID" else float(s))


def grid_tables(table: pd.DataFrame, metric: str = "mean_r1") -> dict[str, pd.DataFrame]:
    """Per method, `metric` averaged over the other keys: rows alpha (IID last), columns missing_rate."""
    done = table[table[metric].notna()].assign(alpha_label=lambda t: t[ALPHA].map(_alpha_label))
    out = {}
    for method, sub in done.groupby(METHOD, sort=False):
        pivot = sub.pivot_table(index="alpha_label", columns=MISSING, values=metric, aggfunc="mean")
        out[method] = pivot.reindex(_alpha_order(pivot.index))
    return out


def gain_tables(grids: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Each method's grid minus FedAvg's (cells where both exist)."""
    if BASELINE not in grids:
        return {}
    base = grids[BASELINE]
    return {m: g.sub(base) for m, g in grids.items() if m != BASELINE}


def plot_heatmaps(grids: dict[str, pd.DataFrame], path: Path, title: str, diverging: bool = False) -> None:
    plt = pyplot()
    n = len(grids)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 3.4), dpi=120, squeeze=False)
    values = np.concatenate([g.to_numpy(dtype=float).ravel() for g in grids.values()])
    values = values[np.isfinite(values)]
    if diverging:
        span = max(1e-9, np.abs(values).max()) if len(values) else 1.0
        vmin, vmax, cmap = -span, span, "RdBu"
    else:
        vmin, vmax, cmap = (values.min(), values.max(), "viridis") if len(values) else (0, 1, "viridis")
    for i, (ax, (method, grid)) in enumerate(zip(axes[0], grids.items())):
        data = grid.to_numpy(dtype=float)
        im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [f"{c:g}" for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), list(grid.index))
        ax.set_xlabel("missing_rate")
        if i == 0:
            ax.set_ylabel("alpha")
        ax.set_title(method)
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                dark = abs(v) > 0.6 * vmax if diverging else v < (vmin + vmax) / 2
                ax.text(j, i, f"{v:+.1f}" if diverging else f"{v:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.85)
    fig.suptitle(title, y=1.04)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def plot_round_curves(curves: pd.DataFrame, path: Path, title: str, metric: str = "mean_r1") -> None:
    """R@1 per round: each trial thin, the mean over a method's trials bold."""
    fig, ax = pyplot().subplots(figsize=(8.4, 4.2), dpi=120)
    for i, (method, sub) in enumerate(curves.groupby("method", sort=False)):
        color = f"C{i % 10}"
        for _, trial in sub.groupby("trial_id"):
            ax.plot(trial["round"], trial[metric], color=color, alpha=0.25, lw=0.8)
        mean = sub.groupby("round")[metric].mean()
        ax.plot(mean.index, mean.to_numpy(), color=color, lw=2, marker="o", ms=3,
                label=f"{method} (mean of {sub['trial_id'].nunique()})")
    save_round_plot(fig, ax, f"{metric} (%)", title, path)


def _md_table(frame: pd.DataFrame, index_name: str = "", fmt: str = "{:.2f}") -> str:
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "—" if not np.isfinite(v) else fmt.format(v)
        return str(v)

    cols = [index_name, *[str(c) for c in frame.columns]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in frame.iterrows():
        lines.append("| " + " | ".join([str(idx), *[cell(v) for v in row]]) + " |")
    return "\n".join(lines)


def results_text(table: pd.DataFrame) -> str:
    """The results table for the terminal: keys, status and headline metrics, one line per trial."""
    if table.empty:
        return "(no trial has started)"
    shown = [*table.attrs.get("keys", []), "status",
             *[c for c in ("mean_r1", "i2t_r1", "t2i_r1", "pers_mean_r1", "rounds", "seconds") if c in table]]
    view = _keys_as_text(table.set_index("trial_id")[shown], table.attrs.get("keys", []))
    if "rounds" in view:  # a count: floats only because an unfinished trial has none
        view["rounds"] = view["rounds"].map(lambda v: "-" if pd.isna(v) else f"{v:.0f}")
    return view.to_string(float_format=lambda v: f"{v:.2f}")


def _keys_as_text(view: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Config values as written (1e-05, 0.1, IID); the metrics keep their float format."""
    view = view.copy()
    for key in keys:
        view[key] = view[key].map(_alpha_label if key == ALPHA else lambda v: f"{v:g}" if isinstance(v, float) else v)
    return view


def _parquet_ready(table: pd.DataFrame) -> pd.DataFrame:
    """One type per column: numbers with nulls (alpha null = IID) as floats with NaN, other mixes as text."""
    out = table.copy()
    for c in out.columns:
        if out[c].dtype == object:
            values = out[c].dropna()
            numeric = values.map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).all()
            out[c] = out[c].astype(float) if numeric and len(values) else \
                out[c].map(lambda v: None if v is None else str(v))
    return out


def write_sweep_report(sweep_dir: str | Path) -> pd.DataFrame:
    """results.csv / results.parquet, heatmap_mean_r1.png, heatmap_gain.png, curves_r1.png and report.md."""
    sweep_dir = Path(sweep_dir)
    table, curves = collect_trials(sweep_dir)
    if table.empty:  # interrupted before any trial started
        (sweep_dir / "report.md").write_text(f"# Sweep `{sweep_dir.name}`\n\nNo trial has started yet.\n")
        return table
    table.to_csv(sweep_dir / "results.csv", index=False)
    _parquet_ready(table).to_parquet(sweep_dir / "results.parquet", index=False)
    spec_file = sweep_dir / SPEC_FILE
    name = yaml.safe_load(spec_file.read_text()).get("name", sweep_dir.name) if spec_file.is_file() else sweep_dir.name
    grids, gains = grid_tables(table), None
    figures = []
    if grids:
        plot_heatmaps(grids, sweep_dir / "heatmap_mean_r1.png", f"{name}: mean R@1 (%)")
        figures.append("heatmap_mean_r1.png")
        gains = gain_tables(grids)
        if gains:
            plot_heatmaps(gains, sweep_dir / "heatmap_gain.png", f"{name}: mean R@1 gain over {BASELINE} (points)",
                          diverging=True)
            figures.append("heatmap_gain.png")
    if len(curves):
        plot_round_curves(curves, sweep_dir / "curves_r1.png", f"{name}: mean R@1 per round")
        figures.append("curves_r1.png")
    status = table["status"].value_counts().to_dict()
    md = [f"# Sweep `{name}`", "",
          f"{len(table)} trials started: " + ", ".join(f"{n} {s}" for s, n in status.items()) + ".", ""]
    if grids:
        md += ["## Mean R@1 (%) by alpha (rows) and missing rate (columns)", ""]
        for method, grid in grids.items():
            md += [f"**{method}**", "", _md_table(grid, "alpha"), ""]
    if gains:
        md += [f"## Gain over {BASELINE} (points of mean R@1)", ""]
        for method, grid in gains.items():
            md += [f"**{method}**", "", _md_table(grid, "alpha", "{:+.2f}"), ""]
    shown = ["status", *table.attrs["keys"], *[c for c in (*HEADLINE, "rounds") if c in table]]
    best = table.sort_values("mean_r1", ascending=False).set_index("trial_id")[shown]
    best = _keys_as_text(best, table.attrs["keys"])
    md += ["## Trials, best first", "", _md_table(best, "trial"), ""]
    md += _failed_trials(sweep_dir, table)
    md += ["## Files", "", "- `results.csv`, `results.parquet`: one row per trial (swept keys, final metrics)"]
    md += [f"- ![{f}]({f})" for f in figures]
    md += ["- `trials/<trial>/run-<trial id>/`: each trial's run folder (metrics.csv, summary.json, ...)", ""]
    (sweep_dir / "report.md").write_text("\n".join(md))
    return table


def _failed_trials(sweep_dir: Path, table: pd.DataFrame) -> list[str]:
    """report.md lines naming each unfinished trial that raised: its error's last line and where
    Tune put the whole traceback."""
    lines = []
    for row in table[table["status"] != "done"].itertuples():
        error = sweep_dir / TRIALS_DIR / row.trial_dir / "error.txt"
        if error.is_file():
            last = next((t for t in reversed(error.read_text().splitlines()) if t.strip()), "").strip()
            lines.append(f"- `{row.trial_id}`: {last} (`{error.relative_to(sweep_dir)}`)")
    return ["## Failed trials (`--resume` runs them again)", "", *lines, ""] if lines else []


def write_run_report(run_dir: str | Path) -> Path:
    """report.md and curves_r1.png for one run folder."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = pd.read_csv(run_dir / "metrics.csv")
    method = summary["method"]
    plot_round_curves(metrics.assign(trial_id=0, method=method), run_dir / "curves_r1.png",
                      f"{run_dir.name}: mean R@1 per round")
    zs = summary["zeroshot"]
    keys = [k for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "mean_r1") if k in zs]
    final = pd.DataFrame({"zero-shot": [zs[k] for k in keys], method: [summary[k] for k in keys],
                          "gain": [summary[k] - zs[k] for k in keys]}, index=keys)
    per_round = metrics.set_index("round")[[c for c in ("mean_r1", "i2t_r1", "t2i_r1", "train_loss") if c in metrics]]
    pers = {k: v for k, v in summary.items() if k.startswith("pers_") and isinstance(v, (int, float))}
    md = [f"# Run `{run_dir.name}`", "",
          f"{method}, preset {summary.get('preset')}, seed {summary.get('seed')}, {summary['rounds']} rounds "
          f"in {summary['seconds']:.1f} s ({summary.get('backend')} backend).", "",
          "## Final metrics", "", _md_table(final, "metric"), ""]
    if pers:
        md += ["## Personalized retrieval", "", _md_table(pd.DataFrame({"value": pers}), "metric"), ""]
    md += ["## Per evaluated round", "", _md_table(per_round, "round"), "", "![curves_r1.png](curves_r1.png)", ""]
    (run_dir / "report.md").write_text("\n".join(md))
    return run_dir / "report.md"


def write_report(path: str | Path) -> Path:
    """`rcsr-ray report DIR`: a run folder (summary.json) or a sweep folder (trials/)."""
    path = Path(path)
    if (path / "summary.json").is_file() and (path / "metrics.csv").is_file():
        return write_run_report(path)
    if (path / TRIALS_DIR).is_dir():
        write_sweep_report(path)
        return path / "report.md"
    raise ConfigError("report", str(path), "a run folder (summary.json, metrics.csv) or a sweep folder (trials/)")

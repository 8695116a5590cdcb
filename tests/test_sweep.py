"""Sweeps: spec validation, trials equal to plain runs, placement groups, resume, reports, CLI."""
import itertools
import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rcsr_ray.cli import main
from rcsr_ray.config import ConfigError, with_overrides
from rcsr_ray.runtime.loop import METRIC_KEYS, run_simulation
from rcsr_ray.sweep.spec import load_spec, parse_spec
from tests.conftest import SMALL

TUNE = Path(__file__).resolve().parents[1] / "tune"


def grid_points(spec) -> list[dict]:
    """Every combination of the grid, in Tune's order (the last key varies slowest)."""
    keys = list(spec.grid)
    return [dict(zip(keys, combo[::-1])) for combo in itertools.product(*[spec.grid[k] for k in reversed(keys)])]


def _small(cache_dir, **extra):
    return {**SMALL, "data.cache_dir": cache_dir, "fed.rounds": 2, **extra}


# ---- specs (no Ray) ----

@pytest.mark.parametrize("name, trials", [("smoke.yaml", 8), ("s4_grid.yaml", 180)])
def test_shipped_specs_validate(name, trials):
    spec = load_spec(TUNE / name)
    assert spec.num_trials == trials
    assert {"partition.alpha", "partition.missing_rate", "fed.method"} <= set(spec.grid)
    points = grid_points(spec)
    assert len(points) == len({json.dumps(p, sort_keys=True) for p in points}) == trials // spec.num_samples


@pytest.mark.parametrize("tree, key", [
    ({"grid": {"partition.alpah": [0.1]}}, "grid.partition.alpah"),  # unknown config key
    ({"grid": {"partition.alpha": []}}, "grid.partition.alpha"),  # empty grid
    ({"grid": {"partition.alpha": [0.1, -1]}}, "grid.partition.alpha"),  # a value the config rejects
    ({"grid": {"fed.method": ["fedavg", "fedsgd"]}}, "grid.fed.method"),
    ({"grid": {"seed": [0]}, "sample": {"train.lr": {"loguniform": [0, 1]}}}, "sample.train.lr.loguniform"),
    ({"grid": {"seed": [0]}, "sample": {"train.lr": {"uniform": [-1, 1]}}}, "sample.train.lr"),  # lower bound
    ({"grid": {"seed": [0]}, "sample": {"fed.method": {"choice": ["rcsr", "x"]}}}, "sample.fed.method"),
    ({"grid": {"seed": [0]}, "sample": {"train.lr": {"normal": [0, 1]}}}, "sample.train.lr"),
    ({"grid": {"seed": [0]}, "config": {"fed.rounds": -2}}, "config: fed.rounds"),
    ({"grid": {"seed": [0]}, "asha": {"grace": 2}}, "asha.grace"),
    ({"grid": {"seed": [0]}, "client_actors": 0}, "client_actors"),
    ({"grids": {"seed": [0]}}, "grids"),  # unknown spec key
    ({}, "grid"),  # nothing swept
    # a combination the config rejects although each value alone is fine
    ({"grid": {"data.synthetic.dim": [16, 64], "data.synthetic.instance_dim": [8, 32]},
      "config": {"data.synthetic.instance_dim": 8}},
     "grid.data.synthetic.instance_dim=32: at most data.synthetic.dim (16)"),
    # a swept value that clashes with a base key: the grid point is named
    ({"grid": {"data.synthetic.dim": [16, 64]}}, "grid point data.synthetic.dim=16: data.synthetic.instance_dim=32"),
])
def test_bad_spec_names_the_key(tree, key):
    with pytest.raises(ConfigError) as err:
        parse_spec(tree, "bad.yaml")
    msg = str(err.value)
    assert f"bad.yaml: {key}" in msg and "\n" not in msg


def test_spec_trial_config_and_actor_layout():
    spec = parse_spec({"config": {"partition.num_clients": 7, "runtime.client_cpus": 0.5}, "client_actors": 3,
                       "grid": {"fed.method": ["fedavg", "central"], "preset": ["S1", "S4"]}})
    assert spec.num_trials == 4
    cfg = spec.trial_config({"fed.method": "fedavg", "preset": "S1"})
    # 7 clients in at most 3 actors: 3 per actor, so 3 actors (the trial reserves exactly that many)
    assert cfg.runtime.clients_per_actor == 3 and cfg.partition.alpha is None  # S1 applies under the spec's keys
    assert spec.trial_config({"fed.method": "fedavg", "preset": "S4"}).partition.alpha == 0.1
    assert spec.trial_config({"fed.method": "central", "preset": "S4"}).runtime.clients_per_actor == 1
    with pytest.raises(ConfigError, match="fed.method.*swept by"):
        parse_spec({"grid": {"fed.method": ["rcsr"]}}, overrides=["fed.method=fedavg"])


def test_trial_resources_match_the_actors_the_trial_creates(ray_session):
    from rcsr_ray.sweep.runner import trial_resources

    spec = parse_spec({"config": {"partition.num_clients": 7, "runtime.client_cpus": 0.5}, "client_actors": 3,
                       "driver_cpus": 2, "grid": {"fed.method": ["fedavg", "central", "zeroshot"],
                                                  "runtime.backend": ["ray", "local"]}})
    bundles = lambda **p: trial_resources(spec)(p).bundles  # noqa: E731
    assert bundles(**{"fed.method": "fedavg", "runtime.backend": "ray"}) == [{"CPU": 2.0}] + [{"CPU": 0.5}] * 3
    assert bundles(**{"fed.method": "central", "runtime.backend": "ray"}) == [{"CPU": 2.0}, {"CPU": 0.5}]
    assert bundles(**{"fed.method": "zeroshot", "runtime.backend": "ray"}) == [{"CPU": 2.0}]  # no training
    assert bundles(**{"fed.method": "fedavg", "runtime.backend": "local"}) == [{"CPU": 2.0}]


def test_cli_bad_spec_one_line_exit_2_before_any_trial(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"grid": {"partition.alpha": [0.1, 0.0]}, "config": {"fed.rounds": 1}}))
    out = tmp_path / "sweep"
    assert main(["sweep", "--spec", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rcsr-ray: config error: {spec}: grid.partition.alpha=0.0: a number > 0, or null for IID"]
    assert not out.exists()


# ---- sweeps on the session's Ray instance (2 CPUs) ----

@pytest.fixture(scope="module")
def smoke_sweep(ray_session, cache_dir, tmp_path_factory):
    """tune/smoke.yaml's shape at test size: 1 alpha x 1 missing rate x 2 methods, 6 clients, Ray actors
    of 1 CPU. Each trial needs its driver CPU plus its client actor's: the whole 2-CPU cluster."""
    from rcsr_ray.sweep.runner import run_sweep, sweep_trial, trial_folder

    def record_placement(config, spec):  # the sweep's trainable, first noting the trial's placement group
        import ray
        from ray.util import get_current_placement_group

        pg, ctx = get_current_placement_group(), ray.get_runtime_context()
        (trial_folder() / "placement.json").write_text(json.dumps(
            {"bundles": pg.bundle_specs, "captures": ctx.should_capture_child_tasks_in_placement_group,
             "pid": os.getpid()}))
        sweep_trial(config, spec)

    tree = yaml.safe_load((TUNE / "smoke.yaml").read_text())
    tree["grid"] = {k: v[:1] if k.startswith("partition.") else v for k, v in tree["grid"].items()}
    tree["config"].update(_small(cache_dir, **{"runtime.backend": "ray", "runtime.client_cpus": 1.0}))
    spec = parse_spec(tree, "smoke-test")
    out = tmp_path_factory.mktemp("sweeps") / "smoke"
    table = run_sweep(spec, out, progress=False, trainable=record_placement)
    return spec, out, table


def test_smoke_trials_equal_plain_runs(smoke_sweep):
    spec, out, table = smoke_sweep
    assert sorted(table["fed.method"]) == ["fedavg", "rcsr"] and (table["status"] == "done").all()
    assert table.attrs["unfinished"] == 0
    for _, row in table.iterrows():
        params = {k: row[k] for k in spec.grid}
        cfg = spec.trial_config(params)
        assert cfg.runtime.backend == "ray" and cfg.partition.alpha == 0.1 and cfg.fed.rounds == 2
        # the same config and seed as a plain run on the local backend
        plain = run_simulation(with_overrides(cfg, {"runtime.backend": "local"}), progress=False)
        for k in (*METRIC_KEYS, "mean_r1", "pers_mean_r1", "pers_worst10_r1"):
            assert row[k] == plain.summary[k], k
        # every evaluated round was reported to Tune (its result.json) and kept in rounds.jsonl
        trial = out / "trials" / row["trial_dir"]
        tune_rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        assert [r["round"] for r in tune_rows] == [1, 2, 2]  # rounds 1, 2, then the final summary
        assert [r["mean_r1"] for r in tune_rows[:2]] == [m["mean_r1"] for m in plain.metrics[1:]]
        assert tune_rows[-1]["pers_mean_r1"] == plain.summary["pers_mean_r1"]


def test_trials_reserve_their_actors_and_do_not_overlap(smoke_sweep):
    spec, out, table = smoke_sweep
    pids = set()
    for trial_dir in table["trial_dir"]:
        placement = json.loads((out / "trials" / trial_dir / "placement.json").read_text())
        # one driver bundle and one bundle for the trial's single client actor; the actor is captured
        assert {k: placement[k] for k in ("bundles", "captures")} == {"bundles": [{"CPU": 1.0}, {"CPU": 1.0}],
                                                                     "captures": True}
        pids.add(placement["pid"])
    # The second trial, staged while the first ran, ran in the first one's actor (reuse_actors),
    # still in its own folder and group, with the plain run's results (test_smoke_trials_equal_plain_runs).
    assert len(pids) == 1
    # two trials of 2 CPUs on a 2-CPU cluster: one after the other, neither failed
    first, second = table.sort_values("trial_start").itertuples()
    assert first.trial_end <= second.trial_start


def test_sweep_reports(smoke_sweep, capsys):
    spec, out, table = smoke_sweep
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 2 and {"partition.alpha", "partition.missing_rate", "fed.method", "mean_r1",
                                  "pers_mean_r1", "zeroshot_mean_r1", "trial_start", "trial_end"} <= set(results)
    assert pd.read_parquet(out / "results.parquet")["mean_r1"].tolist() == results["mean_r1"].tolist()
    for png in ("heatmap_mean_r1.png", "heatmap_gain.png", "curves_r1.png"):
        assert (out / png).stat().st_size > 10_000, png
    gain = table.set_index("fed.method")["mean_r1"]
    report = (out / "report.md").read_text()
    assert f"| 0.1 | {gain['rcsr'] - gain['fedavg']:+.2f} |" in report  # the gain table's one cell
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").read_text() == report
    run = out / "trials" / table["trial_dir"][0] / f"run-{table['trial_id'][0]}"
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert f"| mean_r1 | {table['zeroshot_mean_r1'][0]:.2f} | {table['mean_r1'][0]:.2f} |" in text
    assert (run / "curves_r1.png").stat().st_size > 10_000
    assert main(["report", str(out / "trials")]) == 2
    assert "a run folder (summary.json, metrics.csv) or a sweep folder" in capsys.readouterr().err


def test_resume_runs_only_the_unfinished_trials(ray_session, cache_dir, tmp_path):
    """Three trials, one raising the first time: resumed, only that one runs again."""
    from rcsr_ray.sweep.runner import run_sweep, sweep_trial

    calls = tmp_path / "calls.txt"

    def flaky(config, spec):  # runs in the trial's process; files are the only shared state
        with open(calls, "a") as f:
            f.write(f"{config['partition.alpha']}\n")
        if config["partition.alpha"] == 1.0 and calls.read_text().count("1.0") == 1:
            raise RuntimeError("interrupted on purpose")
        sweep_trial(config, spec)

    spec = parse_spec({"config": _small(cache_dir, **{"runtime.backend": "local"}),
                       "grid": {"partition.alpha": [0.1, 1.0, 100]}, "max_concurrent_trials": 1}, "resume-test")
    out = tmp_path / "sweep"
    first = run_sweep(spec, out, progress=True, trainable=flaky)  # the bar must not break the pickled experiment
    assert first.set_index("partition.alpha")["status"].to_dict() == {0.1: "done", 1.0: "incomplete", 100: "done"}
    assert first.attrs["unfinished"] == 1
    failed = first.set_index("partition.alpha").loc[1.0]
    assert (f"- `{failed['trial_id']}`: RuntimeError: interrupted on purpose (`trials/{failed['trial_dir']}/error.txt`)"
            in (out / "report.md").read_text().splitlines())
    before = first.set_index("trial_id")["trial_start"]
    with pytest.raises(ConfigError, match="--out.*add --resume"):
        run_sweep(spec, out, progress=False)
    changed = parse_spec({"config": _small(cache_dir, **{"runtime.backend": "local"}),
                          "grid": {"partition.alpha": [0.1, 1.0]}, "max_concurrent_trials": 1}, "resume-test")
    with pytest.raises(ConfigError, match="--resume.*same spec"):
        run_sweep(changed, out, resume=True, progress=False)

    final = run_sweep(spec, out, resume=True, progress=False, trainable=flaky)
    assert calls.read_text().split() == ["0.1", "1.0", "100", "1.0"]  # only the failed trial ran again
    assert (final["status"] == "done").all() and len(final) == 3 and final["mean_r1"].notna().all()
    assert final.attrs["unfinished"] == 0
    assert "Failed trials" not in (out / "report.md").read_text()
    kept = final.set_index("trial_id")["trial_start"]
    done_before = first.loc[first["status"] == "done", "trial_id"]
    assert (kept[done_before] == before[done_before]).all()
    # the retried trial equals a plain run of its config
    plain = run_simulation(spec.trial_config({"partition.alpha": 1.0}), progress=False)
    assert final.set_index("partition.alpha").loc[1.0, "mean_r1"] == plain.summary["mean_r1"]


def test_interrupted_sweep_keeps_what_ran_and_resumes(ray_session, cache_dir, tmp_path, capfd, caplog):
    """Ctrl-C (SIGINT to the driver) during the second of three trials: the finished trials stay,
    Tune's own Tuner.restore hint is not shown (the CLI prints --resume), and --resume runs the rest."""
    import signal

    from rcsr_ray.sweep.runner import run_sweep, sweep_trial

    driver, once = os.getpid(), tmp_path / "interrupted"

    def interrupting(config, spec):  # runs in the trial's process; files are the only shared state
        sweep_trial(config, spec)
        if config["partition.alpha"] == 1.0 and not once.exists():
            once.touch()
            os.kill(driver, signal.SIGINT)
            time.sleep(5)  # Tune stops the experiment meanwhile
    spec = parse_spec({"config": _small(cache_dir, **{"runtime.backend": "local"}),
                       "grid": {"partition.alpha": [0.1, 1.0, 100]}, "max_concurrent_trials": 1}, "interrupt-test")
    out = tmp_path / "sweep"
    first = run_sweep(spec, out, progress=False, trainable=interrupting)
    said = capfd.readouterr().err + caplog.text  # Tune logs through Ray's loggers, which pytest captures
    assert "Stop signal received" in said and "Resume experiment with" not in said
    assert 1 <= first.attrs["unfinished"] and len(first) < 3 and (first["status"] == "done").any()
    final = run_sweep(spec, out, resume=True, progress=False, trainable=interrupting)
    assert len(final) == 3 and (final["status"] == "done").all() and final.attrs["unfinished"] == 0


def test_cli_sweep_concurrent_trials_then_resume_of_a_finished_sweep(ray_session, cache_dir, tmp_path, capsys):
    """Two trials of 0.5 + 0.5 CPUs fit the 2-CPU cluster together: they run side by side, each with
    its own client actor (the counterpart of the placement test above)."""
    spec = tmp_path / "two.yaml"
    keys = _small(cache_dir, **{"runtime.backend": "ray", "runtime.client_cpus": 0.5})
    spec.write_text(yaml.safe_dump({"name": "two", "config": keys, "driver_cpus": 0.5,
                                    "grid": {"fed.method": ["fedavg", "fedprox"]}}))
    out = tmp_path / "sweep"
    assert main(["sweep", "--quiet", "--spec", str(spec), "--out", str(out), "fed.rounds=1"]) == 0
    printed = capsys.readouterr().out
    results = pd.read_csv(out / "results.csv")
    assert (results["rounds"] == 1).all() and (results["status"] == "done").all() and len(results) == 2
    assert f"{results['mean_r1'][0]:.2f}" in printed and "2 of 2 trials started;" in printed
    first, second = results.sort_values("trial_start").itertuples()
    assert second.trial_start < first.trial_end  # they overlapped
    assert main(["sweep", "--out", str(out), "--resume", "fed.rounds=2"]) == 2  # keys need --spec
    # resumed without --spec (the folder's spec.yaml): nothing left to run, no trial is rerun
    assert main(["sweep", "--quiet", "--out", str(out), "--resume"]) == 0
    assert pd.read_csv(out / "results.csv")["trial_start"].tolist() == results["trial_start"].tolist()

"""The rcsr-ray command: a run folder with everything the README promises; the partition report."""
import builtins
import json
import os
import re
import shlex
import sys
import threading

import pandas as pd
import pytest
import torch
import yaml

from rcsr_ray.cli import importing_meanwhile, main
from rcsr_ray.runtime.folder import FolderLock
from rcsr_ray.runtime.loop import METRIC_KEYS
from tests.conftest import SMALL


def _args(cache_dir, **extra):
    keys = {**SMALL, "data.cache_dir": cache_dir, "runtime.backend": "local", **extra}
    return [f"{k}={v}" for k, v in keys.items()]


def test_run_writes_run_folder(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--preset", "S2", "--out", str(out), *_args(cache_dir, **{"fed.method": "fedavg"})]) == 0
    table = capsys.readouterr().out
    assert "zero-shot" in table and "fedavg" in table and "mean_r1" in table
    summary = json.loads((out / "summary.json").read_text())
    assert set(METRIC_KEYS) | {"mean_r1", "method", "rounds", "seconds", "zeroshot"} <= set(summary)
    assert summary["method"] == "fedavg" and summary["rounds"] == 3
    assert summary["mean_r1"] == (summary["i2t_r1"] + summary["t2i_r1"]) / 2
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert metrics["round"].tolist() == [0, 1, 2, 3]
    assert pd.read_csv(out / "metrics.csv")["mean_r1"].round(6).tolist() == metrics["mean_r1"].round(6).tolist()
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["preset"] == "S2" and resolved["partition"]["alpha"] == 0.5
    ckpt = torch.load(out / "final.pt")
    assert torch.isfinite(ckpt["params"]).all() and ckpt["summary"]["mean_r1"] == summary["mean_r1"]
    assert (out / "curves.png").stat().st_size > 10_000
    assert len(pd.read_csv(out / "partition.csv")) == SMALL["partition.num_clients"]


def test_run_on_ray_prints_the_local_backends_table(tmp_path, cache_dir, capsys, ray_session):
    """The Ray path of `rcsr-ray run` (Ray started while torch imports, then the driver actor)
    prints the table the local backend prints."""
    tables = {}
    for backend in ("local", "ray"):
        args = _args(cache_dir, **{"fed.method": "fedavg", "fed.rounds": 2, "runtime.backend": backend})
        assert main(["run", "--quiet", "--out", str(tmp_path / backend), *args]) == 0
        tables[backend] = capsys.readouterr().out.split("\n\n")[0]
    assert "fedavg" in tables["ray"] and "mean_r1" in tables["ray"]
    assert tables["ray"] == tables["local"]


def test_importing_meanwhile_overlaps_and_raises_in_the_callers_thread(tmp_path, monkeypatch):
    """`rcsr-ray run` starts Ray while torch imports: the two overlap, and an error on either side
    reaches the caller."""
    started = threading.Event()
    monkeypatch.setattr(builtins, "_rcsr_import_test", started, raising=False)
    (tmp_path / "waits_for_caller.py").write_text("import builtins\nOVERLAPPED = builtins._rcsr_import_test.wait(30)\n")
    (tmp_path / "broken_module.py").write_text("raise ImportError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    assert importing_meanwhile("waits_for_caller", lambda x: started.set() or x + 1, 41) == 42
    assert sys.modules["waits_for_caller"].OVERLAPPED  # the import waited for the caller's function
    with pytest.raises(ImportError, match="broken on purpose"):
        importing_meanwhile("broken_module", lambda: None)

    def fails():
        raise RuntimeError("no cluster")
    with pytest.raises(RuntimeError, match="no cluster"):  # the caller's error first, the import joined
        importing_meanwhile("broken_module", fails)


def test_partition_command(tmp_path, cache_dir, capsys):
    png = tmp_path / "p.png"
    assert main(["partition", "--plot", str(png), *_args(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "mean KL" in out and "image-only" in out and "text-only" in out
    assert png.stat().st_size > 5_000


def test_too_many_clients_for_the_data_is_a_one_line_error(tmp_path, cache_dir, capsys):
    # 600 training images, 16 per client at least: 37 clients fit, 100 do not.
    code = main(["run", "--quiet", "--out", str(tmp_path / "r"), *_args(cache_dir, **{"partition.num_clients": 100})])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert re.fullmatch(r"rcsr-ray: config error: partition.num_clients=100: at most 37: \S+synthetic-\w+ has 600 "
                        r"training images and each client needs partition.min_samples=16", err[-1])


def test_run_folder_that_cannot_take_the_run_is_a_one_line_error(tmp_path, cache_dir, capsys):
    afile = tmp_path / "afile"
    afile.write_text("notes")
    assert main(["run", "--quiet", "--out", str(afile), *_args(cache_dir)]) == 2
    assert capsys.readouterr().err.strip() == f"rcsr-ray: --out {afile}: a file, not a folder"
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--out", str(out), *_args(cache_dir, **{"fed.rounds": 2})]) == 0
    capsys.readouterr()
    for other, said in (({"train.lr": 0.005}, "train.lr: 0.001 -> 0.005"), ({"fed.rounds": 1}, "fed.rounds: 2 -> 1")):
        assert main(["run", "--quiet", "--out", str(out), *_args(cache_dir, **{"fed.rounds": 2, **other})]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2  # the run there is kept
    with FolderLock(out):  # as a run still writing there holds it
        assert main(["run", "--quiet", "--out", str(out), *_args(cache_dir, **{"fed.rounds": 2})]) == 2
    assert capsys.readouterr().err.strip() == (f"rcsr-ray: --out {out}: another run (pid {os.getpid()}) is writing "
                                               "to it; wait until it ends, or choose another --out")


def test_interrupted_run_says_how_to_continue(tmp_path, cache_dir, capsys, monkeypatch):
    import rcsr_ray.runtime.loop as loop

    real = loop.run_simulation

    def interrupted(cfg, out_dir, **kw):  # Ctrl-C once round 2 is checkpointed
        with pytest.raises(loop.StopAfter):
            real(cfg, out_dir, stop_after=2, **kw)
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "run_simulation", interrupted)
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--out", str(out), *_args(cache_dir)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    hint = f"rcsr-ray run --config {out / 'config.yaml'} --out {out}"
    assert err[-1] == f"rcsr-ray: interrupted; {out} keeps its last checkpoint; continue with: {hint}"
    monkeypatch.setattr(loop, "run_simulation", real)
    assert main(shlex.split(hint)[1:] + ["--quiet"]) == 0  # the hint, as printed, finishes the run
    assert json.loads((out / "summary.json").read_text())["rounds"] == 3


def test_a_failed_start_leaves_the_folder_free(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--out", str(out), *_args(cache_dir, **{"partition.num_clients": 100})]) == 2
    assert not out.exists()  # the federation could not be built: nothing written
    (out / "config.yaml").parent.mkdir()  # as a run interrupted before its first checkpoint leaves it
    (out / "config.yaml").write_text(yaml.safe_dump({"fed": {"rounds": 9}}))
    assert main(["run", "--quiet", "--out", str(out), *_args(cache_dir)]) == 0  # nothing there to lose
    assert yaml.safe_load((out / "config.yaml").read_text())["fed"]["rounds"] == 3
    below = tmp_path / "afile" / "run"
    below.parent.write_text("notes")
    assert main(["run", "--quiet", "--out", str(below), *_args(cache_dir)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--out {below}: {below.parent} is a file, not a folder")

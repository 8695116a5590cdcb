"""`rcsr-ray`: run simulations, sweeps and comparisons, encode real datasets, inspect partitions, report."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import threading
from datetime import datetime
from pathlib import Path

from rcsr_ray.config import ConfigError, dump_yaml, load_config
from rcsr_ray.data.store import StoreError

TABLE_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "mean_r1")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--preset", help="scenario preset S1..S4 (default: the --config file's, else S4); its keys beat the "
                   "file's, key=value overrides beat both")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _load(args):
    return load_config(args.config, args.overrides, preset=args.preset)


def _default_out(method: str) -> Path:
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{method}"


def results_table(summary: dict) -> str:
    zs = summary["zeroshot"]
    head = f"{'metric':<10}{'zero-shot':>11}{summary['method']:>11}{'gain':>9}"
    lines = [head, "-" * len(head)]
    for k in TABLE_KEYS:
        lines.append(f"{k:<10}{zs[k]:>11.2f}{summary[k]:>11.2f}{summary[k] - zs[k]:>+9.2f}")
    return "\n".join(lines)


def importing_meanwhile(module: str, fn, *args):
    """fn(*args) while `module` is imported in another thread. Returns once both are done; an error
    of fn comes first, else the import's."""
    failed: list[BaseException] = []

    def load() -> None:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # raised in the caller's thread below
            failed.append(exc)

    thread = threading.Thread(target=load, name=f"import {module}", daemon=True)
    thread.start()
    try:
        result = fn(*args)
    finally:
        thread.join()
    if failed:
        raise failed[0]
    return result


def cmd_run(args) -> int:
    from rcsr_ray.runtime.folder import CONFIG, check, continue_command

    cfg = _load(args)
    out = Path(args.out) if args.out else _default_out(cfg.fed.method)
    check(out, cfg)  # before Ray's start: a folder that cannot take this run fails at once
    print(f"rcsr-ray run: method={cfg.fed.method} preset={cfg.preset} clients={cfg.partition.num_clients} "
          f"rounds={cfg.fed.rounds} backend={cfg.runtime.backend} -> {out}", file=sys.stderr)
    try:
        if cfg.runtime.backend == "ray":
            from rcsr_ray.runtime.connect import ensure_ray

            # Ray's start (about 7 s on 2 cores, in its own processes) leaves a core idle part of the
            # time; torch's import (2.5 s on one core), which the driver module needs, fills it.
            importing_meanwhile("torch", ensure_ray, cfg)
            from rcsr_ray.runtime.driver import run_on_ray

            result = run_on_ray(cfg, out, progress=not args.quiet)
        else:
            from rcsr_ray.runtime.loop import run_simulation

            result = run_simulation(cfg, out, progress=not args.quiet)
    except KeyboardInterrupt:
        if not (out / CONFIG).is_file():
            said = " before its first round: run the same command again"
        elif (out / "checkpoint.pt").is_file():
            said = f"; {out} keeps its last checkpoint; continue with: {continue_command(out)}"
        else:
            said = (f"; {out} has no checkpoint yet (one every {cfg.runtime.checkpoint_every} rounds); "
                    f"start again with: {continue_command(out)}")
        print(f"\nrcsr-ray: interrupted{said}", file=sys.stderr)
        return 130
    print(results_table(result.summary))
    print(f"\n{result.summary['rounds']} rounds in {result.summary['seconds']:.1f} s; run folder: {out}")
    return 0


def _csv(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def cmd_compare(args) -> int:
    from rcsr_ray.config import METHODS, ConfigError
    from rcsr_ray.runtime.compare import format_table, run_compare

    cfg = _load(args)
    methods = list(dict.fromkeys(_csv(args.methods)))  # each once, in the order given
    if not methods:
        raise ConfigError("--methods", args.methods, f"comma-separated methods from {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise ConfigError("--methods", m, f"methods from {', '.join(METHODS)}")
    if args.seeds is None:
        seeds = [cfg.seed]  # the config's seed (seed=N, or the --config file's)
    else:
        try:
            seeds = list(dict.fromkeys(_csv(args.seeds, int)))
        except ValueError:
            seeds = []
        if not seeds or min(seeds) < 0:
            raise ConfigError("--seeds", args.seeds, "comma-separated integers >= 0")
    out = Path(args.out) if args.out else _default_out("compare")
    frame = run_compare(cfg, methods, seeds, out, progress=not args.quiet)
    print(format_table(frame, methods))
    print(f"\n{len(frame)} runs; {out / 'compare.csv'}, {out / 'compare.png'}")
    return 0


def cmd_partition(args) -> int:
    from rcsr_ray.data.federation import build_federation
    from rcsr_ray.data.partition import plot_partition, skew_kl, summary_frame

    cfg = _load(args)
    fed = build_federation(cfg)
    frame = summary_frame(fed.partition)
    print(frame.to_string(index=False))
    print(f"\nmean KL(client mix || global mix) = {skew_kl(fed.partition):.3f}")
    png = Path(args.plot)
    png.parent.mkdir(parents=True, exist_ok=True)
    plot_partition(fed.partition, png, title=f"alpha={cfg.partition.alpha}, missing_rate={cfg.partition.missing_rate}")
    print(f"plot: {png}")
    return 0


def cmd_config(args) -> int:
    print(dump_yaml(_load(args)), end="")
    return 0


def cmd_sweep(args) -> int:
    from rcsr_ray.sweep.spec import load_saved_spec, load_spec

    if args.resume and not args.out:
        raise ConfigError("--resume", True, "needs --out DIR, the sweep folder to continue")
    if args.spec:
        spec = load_spec(args.spec, args.overrides)
    elif args.resume:
        if args.overrides:
            raise ConfigError(args.overrides[0], None, "keys need --spec (a resumed sweep keeps its spec.yaml)")
        spec = load_saved_spec(args.out)
    else:
        raise ConfigError("--spec", None, "a sweep spec YAML file (see tune/)")
    # Ray Tune is imported only once the spec is known to be good: a bad one fails in a blink.
    from rcsr_ray.sweep.report import results_text
    from rcsr_ray.sweep.runner import run_sweep

    out = Path(args.out) if args.out else _default_out(f"sweep-{spec.name}")
    print(f"rcsr-ray sweep: {spec.name}: {spec.num_trials} trials, swept {', '.join(spec.swept)} -> {out}",
          file=sys.stderr)
    table = run_sweep(spec, out, resume=args.resume, progress=not args.quiet)
    print(results_text(table))
    print(f"\n{len(table)} of {spec.num_trials} trials started; {out / 'results.csv'}, {out / 'report.md'}")
    if table.attrs["unfinished"]:
        print(f"rcsr-ray sweep: {table.attrs['unfinished']} of {spec.num_trials} trials failed or did not finish; "
              f"continue with: rcsr-ray sweep --out {out} --resume", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from rcsr_ray.sweep.report import write_report

    print(f"report: {write_report(args.dir)}")
    return 0


def cmd_encode(args) -> int:
    from rcsr_ray.runtime.encode import encode_command

    return encode_command(args.dataset, args.root, args.out, args.model, annotations=args.annotations,
                          pretrained=args.pretrained, seed=args.seed, shard_size=args.shard_size,
                          actors=args.actors, gpu_share=args.gpu_share, progress=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcsr-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run one federated simulation")
    _config_args(run)
    run.add_argument("--out", help="run folder (default runs/<time>-<method>)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)
    comp = sub.add_parser("compare", help="several methods on the same partitions and seeds")
    _config_args(comp)
    comp.add_argument("--methods", required=True, help="comma-separated, e.g. fedavg,fedprox,rcsr")
    comp.add_argument("--seeds", help="comma-separated seeds (default: the config's seed)")
    comp.add_argument("--out", help="folder (default runs/<time>-compare)")
    comp.add_argument("--quiet", action="store_true", help="no progress bar")
    comp.set_defaults(func=cmd_compare)
    part = sub.add_parser("partition", help="print and plot the client partition")
    _config_args(part)
    part.add_argument("--plot", default="partition.png", help="PNG of per-client cluster histograms")
    part.set_defaults(func=cmd_partition)
    conf = sub.add_parser("config", help="print the resolved config")
    _config_args(conf)
    conf.set_defaults(func=cmd_config)
    sweep = sub.add_parser("sweep", help="a Ray Tune sweep over config keys (spec: tune/*.yaml)")
    sweep.add_argument("--spec", help="sweep spec YAML (optional with --resume: the folder's spec.yaml)")
    sweep.add_argument("--out", help="sweep folder (default runs/<time>-sweep-<name>)")
    sweep.add_argument("--resume", action="store_true", help="continue the sweep in --out; finished trials are kept")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.add_argument("overrides", nargs="*", metavar="key.sub=value", help="base config overrides (not swept keys)")
    sweep.set_defaults(func=cmd_sweep)
    rep = sub.add_parser("report", help="plots and report.md for a run folder or a sweep folder")
    rep.add_argument("dir", help="run folder or sweep folder")
    rep.set_defaults(func=cmd_report)
    enc = sub.add_parser("encode", help="encode a real dataset into a feature store (open_clip on Ray Data)")
    enc.add_argument("--dataset", required=True, choices=("coco", "flickr30k", "csv"))
    enc.add_argument("--root", required=True, help="image folder (image paths are relative to it)")
    enc.add_argument("--annotations", help="Karpathy JSON (default ROOT/dataset_<name>.json) or a .csv/.jsonl "
                     "of image_path,caption[,split]")
    enc.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32")
    enc.add_argument("--pretrained", help="open_clip pretrained tag or a local checkpoint file (default: random weights)")
    enc.add_argument("--out", required=True, help="feature store folder")
    enc.add_argument("--seed", type=int, default=0, help="seed of random weights when --pretrained is not given")
    enc.add_argument("--shard-size", type=int, default=256, help="images or captions per shard: batch and resume unit")
    enc.add_argument("--actors", type=int, help="encoder actors (default: one per --gpu-share of each GPU, "
                     "else half the CPUs)")
    enc.add_argument("--gpu-share", type=float, default=0.5, help="GPU fraction per encoder actor (default 0.5)")
    enc.add_argument("--quiet", action="store_true", help="no progress bar")
    enc.set_defaults(func=cmd_encode)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from rcsr_ray.runtime.folder import RunFolderError

    try:
        return args.func(args)
    except (ConfigError, StoreError, RunFolderError) as exc:
        print(f"rcsr-ray: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nrcsr-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

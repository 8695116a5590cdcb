"""Encode throughput: the Ray Data pipeline of `rcsr-ray encode` versus a plain in-process loop, same run.

Both encode the same generated shapes dataset (COCO Karpathy format) with the same model, shard by
shard with the same batch (one shard), from JPEG files on disk to embeddings:

- loop: one process; load the model, then per shard decode + preprocess with PIL and encode;
- pipeline: `encode_dataset` (decode in Ray CPU tasks, encode in an actor pool), images and captions,
  written to a feature store.

Images/s count from the start (model loading, worker and actor start-up included) to the last
image shard. On the 2-core CPU machine with the tiny test model the pipeline's fixed costs (a fresh
worker and actor process each importing torch, object transfers) dominate; the pipeline is built
for GPUs and many files:

    python benchmarks/encode.py                                  # CPU, tiny model (rcsr-tiny)
    python benchmarks/encode.py --gpu --images 20000             # GPU machine: ViT-B-32, random weights

`--gpu` also reports peak GPU memory: the loop's (torch), and the device's during the pipeline
(nvidia-smi: all actors, plus the driver's CUDA context left from the loop). The last line is one
JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

from rcsr_ray.data.readers import read_dataset
from rcsr_ray.data.shapes import make_shapes_dataset
from rcsr_ray.models.backbone import load_backbone


def loop_encode(data, model: str, shard: int, device: str) -> tuple[float, float]:
    """Seconds for all images, and peak GPU MiB (0 on CPU)."""
    t0 = time.perf_counter()
    bb = load_backbone(model, device=device)
    for a in range(0, data.num_images, shard):
        pixels = torch.stack([bb.preprocess(Image.open(data.image_file(i)).convert("RGB"))
                              for i in range(a, min(a + shard, data.num_images))])
        bb.encode_images(pixels)  # returns numpy: synchronises with the GPU
    mem = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    return time.perf_counter() - t0, mem


def gpu_used_mib() -> float:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(sum(float(x) for x in out.split()))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return float("nan")


def pipeline_encode(data, model: str, shard: int, out: Path, actors: int | None, gpu_share: float, gpu: bool):
    from rcsr_ray.runtime.encode import encode_dataset

    arrivals, peak = [], [0.0]

    def on_shard(kind, _shard):
        if kind == "images":
            arrivals.append(time.perf_counter())
            if gpu and len(arrivals) % 4 == 1:
                peak[0] = max(peak[0], gpu_used_mib())

    t0 = time.perf_counter()
    _, report = encode_dataset(data, out, model, shard_size=shard, actors=actors, gpu_share=gpu_share,
                               progress=False, on_shard=on_shard)
    return arrivals[-1] - t0, arrivals[0] - t0, peak[0], report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shard", type=int, default=None, help="images per shard/batch (default 64 CPU, 256 GPU)")
    ap.add_argument("--image-size", type=int, default=None, help="side of generated JPEGs (default 64 CPU, 320 GPU)")
    ap.add_argument("--gpu", action="store_true", help="ViT-B-32 (random weights) on the GPU(s)")
    ap.add_argument("--model", default=None, help="override the model (default rcsr-tiny, or ViT-B-32 with --gpu)")
    ap.add_argument("--actors", type=int, default=None, help="pipeline encoder actors (default: encode's)")
    ap.add_argument("--gpu-share", type=float, default=0.5)
    args = ap.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device visible")
    model = args.model or ("ViT-B-32" if args.gpu else "rcsr-tiny")
    shard = args.shard or (256 if args.gpu else 64)
    size = args.image_size or (320 if args.gpu else 64)
    warnings.simplefilter("ignore")  # random weights, on purpose
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    from rcsr_ray.runtime.connect import start_local_ray

    tmp = Path(tempfile.mkdtemp(prefix="rcsr-encode-bench-"))
    try:
        n_test = max(1, args.images // 10)
        make_shapes_dataset(tmp / "data", {"train": args.images - n_test, "test": n_test}, captions_per_image=2,
                            image_size=size, seed=0)
        data = read_dataset("coco", tmp / "data")
        loop_s, loop_mem = loop_encode(data, model, shard, "cuda" if args.gpu else "cpu")
        if args.gpu:
            torch.cuda.empty_cache()
        start_local_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)
        pipe_s, first_s, pipe_mem, report = pipeline_encode(data, model, shard, tmp / "features", args.actors,
                                                   args.gpu_share, args.gpu)
        cluster = ray.cluster_resources()
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = data.num_images
    res = {
        "model": model, "images": n, "shard": shard, "image_side": size, "gpu": bool(args.gpu),
        "cpus": cluster.get("CPU", 0), "gpus": cluster.get("GPU", 0),
        "loop_images_per_s": n / loop_s, "pipeline_images_per_s": n / pipe_s,
        "pipeline_captions_per_s": report.captions_this_run / report.seconds_captions,
        "ratio": (n / pipe_s) / (n / loop_s),
        # start-up (model loads, actors, first decode) versus the rate once shards flow
        "pipeline_first_shard_s": first_s,
        "pipeline_steady_images_per_s": (n - min(shard, n)) / (pipe_s - first_s) if pipe_s > first_s else float("nan"),
    }
    if args.gpu:
        res.update(loop_gpu_peak_mib=loop_mem, pipeline_gpu_used_peak_mib=pipe_mem)
    print(f"{model}: {n} images ({size}px JPEG), shard {shard}, {res['cpus']:.0f} CPUs, {res['gpus']:.0f} GPUs")
    print(f"{'':<10}{'images/s':>10}{'seconds':>9}")
    print(f"{'loop':<10}{res['loop_images_per_s']:>10.1f}{loop_s:>9.1f}")
    print(f"{'pipeline':<10}{res['pipeline_images_per_s']:>10.1f}{pipe_s:>9.1f}")
    print(f"pipeline/loop ratio {res['ratio']:.2f}; pipeline captions/s {res['pipeline_captions_per_s']:.1f}")
    print(f"pipeline: first image shard after {first_s:.1f} s, then {res['pipeline_steady_images_per_s']:.1f} images/s")
    if args.gpu:
        print(f"GPU memory: loop peak {loop_mem:.0f} MiB (torch), pipeline peak {pipe_mem:.0f} MiB (nvidia-smi)")
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}))


if __name__ == "__main__":
    main()

"""Time rcsr_ray.eval.retrieval.evaluate on a COCO-5K-sized problem.

Random unit vectors (seed 0): 5,000 images, 5 captions each (25,000), d=512, CPU float32.
Prints a small table (best/mean of --repeats runs, plus the bare score GEMM as a floor); the
LAST line is one JSON object whose "seconds" is the best standard-protocol time.

    PYTHONPATH=. python benchmarks/eval_speed.py [--images N] [--captions-per-image K]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from rcsr_ray.eval.retrieval import evaluate  # noqa: E402


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--captions-per-image", type=int, default=5)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3, help="best-of-N timing")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    n_img, n_txt = args.images, args.images * args.captions_per_image
    img = _unit(rng, n_img, args.dim)
    txt = _unit(rng, n_txt, args.dim)
    t2i = np.repeat(np.arange(n_img), args.captions_per_image)

    print(f"images={n_img} captions={n_txt} d={args.dim} chunk={args.chunk_size} "
          f"torch_threads={torch.get_num_threads()}")
    print(f"{'protocol':<10} {'best_s':>8} {'mean_s':>8} {'rsum':>8}")
    best = {}
    # Floor: the bare chunked score GEMM every exact method must do (no ranking at all).
    # Reported alongside so numbers from a busy/shared machine can be read relative to it.
    img_t, txt_t = torch.from_numpy(img), torch.from_numpy(txt)
    times = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for s in range(0, n_img, args.chunk_size):
                img_t[s : s + args.chunk_size] @ txt_t.T
            times.append(time.perf_counter() - t0)
    best["gemm"] = min(times)
    print(f"{'gemm-only':<10} {min(times):8.3f} {np.mean(times):8.3f} {'-':>8}")
    for protocol in ("standard", "diagonal"):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            m = evaluate(img, txt, t2i, protocol=protocol, chunk_size=args.chunk_size)
            times.append(time.perf_counter() - t0)
        best[protocol] = min(times)
        print(f"{protocol:<10} {min(times):8.3f} {np.mean(times):8.3f} {m['rsum']:8.2f}")
    print(json.dumps({
        "images": n_img,
        "captions": n_txt,
        "dim": args.dim,
        "protocol": "standard",
        "seconds": round(best["standard"], 3),
        "diagonal_seconds": round(best["diagonal"], 3),
        "gemm_only_seconds": round(best["gemm"], 3),
    }))


if __name__ == "__main__":
    main()
